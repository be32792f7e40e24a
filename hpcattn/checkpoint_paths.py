"""What kind of checkpoint ``model.path`` names, from the path alone (no file is read): used by
config validation and the model loaders alike (bottom of the import order, beside config)."""

from __future__ import annotations

from pathlib import Path


def is_gguf(path: str | Path | None) -> bool:
    """Whether ``model.path`` names a GGUF file (by its ``.gguf`` suffix)."""
    return path is not None and str(path).lower().endswith(".gguf")


def has_tokenizer(path: str | Path | None) -> bool:
    """Whether ``model.path`` carries a tokenizer: a GGUF file (its metadata), or a directory with
    ``tokenizer.json``."""
    return path is not None and (is_gguf(path) or (Path(path) / "tokenizer.json").is_file())
