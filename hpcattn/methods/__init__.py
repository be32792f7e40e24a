"""Distributed attention methods, one file each, all built on ``kernels`` and ``comm``.

* :mod:`~hpcattn.methods.local` - the whole problem on one rank (the single-device baseline);
* :mod:`~hpcattn.methods.tree` - tree decode: KV sharded, q replicated, one collective merge;
* :mod:`~hpcattn.methods.ring` - ring prefill (contiguous or zigzag) and KV-rotating ring decode;
* :mod:`~hpcattn.methods.torch_cp` - PyTorch's ``context_parallel`` ring, the prefill peer (GPUs);
* :mod:`~hpcattn.methods.star`, :mod:`~hpcattn.methods.apb` - approximate prefill (Star, APB);
* :mod:`~hpcattn.methods.sharding` - how tokens are laid out over ranks.

Every method returns ``(out, lse)`` (``torch_cp``: out only, SDPA gives no lse) in the kernels' convention for the rows this rank owns.
"""

from hpcattn.methods.local import local_attention  # noqa: F401
from hpcattn.methods.ring import ring_decode, ring_prefill  # noqa: F401
from hpcattn.methods.tree import tree_decode  # noqa: F401
