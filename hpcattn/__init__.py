"""hpcattn: distributed long-context attention methods on MPI ranks, with HDF5 records.

Layers (one folder each): ``kernels`` (local attention returning ``(out, lse)`` and the one merge)
-> ``comm`` (MPI host/staged/device, NCCL/gloo bootstrapped from MPI) -> ``methods`` (one file per
algorithm) -> ``jobs`` (decode and prefill jobs, inputs, timing) -> ``results`` (HDF5 record,
report, plot), driven by ``cli``.
"""

__version__ = "0.1.0"
