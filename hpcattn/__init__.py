"""hpcattn: distributed long-context attention methods on MPI ranks, with HDF5 records.

Layers, lowest first (README.md's Layout section; ``tests/test_layers.py`` keeps imports pointing
down): the ground (``errors``, ``dtypes``, ``timing``, ``launch``, ``config``) -> ``kernels`` (local
attention returning ``(out, lse)`` and the one merge), ``comm`` (MPI host/staged/device, NCCL/gloo
bootstrapped from MPI), ``watchdog``, ``results`` (HDF5 record, report, plot) -> ``graph``,
``collective`` -> ``methods`` (one file per algorithm) -> ``model`` (the Llama runner, Lamina) ->
``jobs`` (the jobs, their cases and records, the run's orchestration) -> ``cli``.
"""

__version__ = "0.1.0"
