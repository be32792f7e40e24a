"""The torch dtype of each ``shape.dtype`` name.

The names themselves are the config schema's choices (:data:`hpcattn.config.DTYPES`); this module
maps them to torch dtypes for the layers that build tensors (``DTYPES["bfloat16"]`` is
``torch.bfloat16``).
"""

from __future__ import annotations

import torch

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
