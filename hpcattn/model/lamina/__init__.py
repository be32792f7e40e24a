"""Lamina (arXiv 2405.01814, spec lamina.md): model-attention disaggregated greedy decoding, a plan
applied to a finished model from outside (the model, :mod:`hpcattn.model.llama`, never imports it).

The one door to the package:

* :mod:`~hpcattn.model.lamina.decoder` - the roles (:class:`Layout`), the schedule and the
  per-layer exchange of :class:`LaminaDecoder`, and the one-process reference
  (:func:`reference_generate`);
* :mod:`~hpcattn.model.lamina.ops` - the per-slice ops (:func:`project_q`, :func:`project_kv`,
  :func:`finish_layer`, :func:`fold_new_token`, :func:`append_new_token`);
* :mod:`~hpcattn.model.lamina.steps` - each role's work between exchanges as static callables
  (graph mode, and what the cost model measures: :class:`ModelSlices`, :class:`ModelRole`,
  :class:`AttentionRole`).

* :mod:`~hpcattn.model.lamina.cost` - the analytic cost model (step time, throughput, the batch
  the memory allows, against colocated decode): pure arithmetic, imported from there.

The Lamina case of the generate job (config, record, estimate) is :mod:`hpcattn.jobs.lamina`; the
measurements that feed the cost model and the ``lamina-cost`` command :mod:`hpcattn.jobs.lamina_cost`.
Reads no config.
"""

from hpcattn.model.lamina.decoder import (BYTE_PHASES, DECODE_PHASES, MODEL, LaminaDecoder, Layout,  # noqa: F401
                                          RankResult, kept_indices, reference_generate)
from hpcattn.model.lamina.ops import (append_new_token, finish_layer, fold_new_token, project_kv,  # noqa: F401
                                      project_q)
from hpcattn.model.lamina.steps import AttentionRole, ModelRole, ModelSlices, exchange_buffers, split_step  # noqa: F401
