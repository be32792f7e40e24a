"""The tokenizer and chat template of a checkpoint, from a Hugging Face directory or a GGUF file.

* Hugging Face directory: ``tokenizer.json`` (the ``tokenizers`` package), the chat template from
  ``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``, the end tokens from
  ``generation_config.json`` / ``tokenizer_config.json``'s ``eos_token``;
* GGUF file (llama.cpp): ``tokenizer.ggml.*`` metadata (:func:`gguf_tokenizer`
  builds the same byte-level BPE transformers builds from it), ``tokenizer.chat_template``.

The chat template is rendered with Jinja2 as transformers renders it (sandboxed, ``trim_blocks``,
``lstrip_blocks``, ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``).
Used by the generate job (``generate.prompt_text``, the record's ``text``) and the eval job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hpcattn.checkpoint_paths import is_gguf
from hpcattn.errors import ConfigError, InputError
from hpcattn.model.gguf import GGUFFile


@dataclass
class TextTokenizer:
    """Text <-> token ids of one checkpoint.

    Attributes:
        backend: a ``tokenizers.Tokenizer``.
        chat_template: Jinja2 source, or None (the model has no chat template).
        stop_ids: token ids that end an answer (eos, ``<|im_end|>``, ``<|eot_id|>``, ...).
        bos_token, eos_token: their text, as the template sees them.
    """
    backend: object
    chat_template: str | None = None
    stop_ids: list[int] = field(default_factory=list)
    bos_token: str = ""
    eos_token: str = ""

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text`` (special tokens written in it parsed as such). ``special``: add the
        tokenizer's own (a BOS where it adds one); off for text a chat template made, which holds
        them already (as transformers' ``apply_chat_template`` tokenizes)."""
        return self.backend.encode(text, add_special_tokens=special).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """:meth:`encode` of each text (``special=False``), in one call."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def chat(self, user: str) -> str:
        """``user`` as one user turn, with the assistant's turn opened (the model's chat template);
        the text itself when the model has no template."""
        if not self.chat_template:
            return user
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ConfigError("a chat template needs the 'jinja2' package (pip install jinja2)") from None

        def raise_exception(msg):
            raise InputError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=[{"role": "user", "content": user}], add_generation_prompt=True,
            bos_token=self.bos_token, eos_token=self.eos_token)


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """The tokenizer of ``model.path`` (a checkpoint directory or a GGUF file)."""
    try:
        import tokenizers  # noqa: F401  (optional package)
    except ImportError:
        raise ConfigError("the model's tokenizer needs the 'tokenizers' package (pip install tokenizers)") from None
    if is_gguf(path):
        return gguf_tokenizer(path)
    return _hf_tokenizer(Path(path))


def _read_json(p: Path) -> dict:
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"model.path: {p}: cannot read: {e}") from None
    return d if isinstance(d, dict) else {}


def _token_text(v) -> str:
    """tokenizer_config.json's ``bos_token``/``eos_token``: a string or an AddedToken object."""
    return v.get("content", "") if isinstance(v, dict) else (v or "")


def _hf_tokenizer(path: Path) -> TextTokenizer:
    from tokenizers import Tokenizer

    tj = path / "tokenizer.json"
    if not tj.is_file():
        raise InputError(f"model.path: {path} has no tokenizer.json")
    try:
        backend = Tokenizer.from_file(str(tj))
    except Exception as e:     # tokenizers raises its own Exception type
        raise InputError(f"model.path: {tj}: not a readable tokenizer ({e})") from None
    tc = _read_json(path / "tokenizer_config.json")
    template = tc.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):         # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    bos, eos = _token_text(tc.get("bos_token")), _token_text(tc.get("eos_token"))
    gen = _read_json(path / "generation_config.json")
    stop = gen.get("eos_token_id", [])
    stop = [stop] if isinstance(stop, int) else list(stop or [])
    if eos and backend.token_to_id(eos) is not None:
        stop.append(backend.token_to_id(eos))
    return TextTokenizer(backend, template, sorted(set(stop)), bos, eos)


def gguf_tokenizer(path: str | Path):
    """:class:`TextTokenizer` from a GGUF file's ``tokenizer.*`` metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    f = GGUFFile(path)
    m = f.meta
    kind = m.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise InputError(f"model.path: {path}: tokenizer.ggml.model {kind!r} is not supported (gpt2: byte-level "
                         f"BPE); give the prompt as token ids (generate.prompt_ids)")
    tokens = list(m["tokenizer.ggml.tokens"])
    merges = [tuple(x.split(" ", 1)) for x in m.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, dropout=None,
                                   continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(m.get("tokenizer.ggml.add_space_prefix",
                                                                                  False)))
    backend.decoder = decoders.ByteLevel()
    types = m.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, ty in enumerate(types) if ty == 3])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, ty in enumerate(types) if ty == 4])

    def text(key):
        i = m.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

    bos, eos = text("tokenizer.ggml.bos_token_id"), text("tokenizer.ggml.eos_token_id")
    if m.get("tokenizer.ggml.add_bos_token") and bos:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1",
                                                               special_tokens=[(bos, tokens.index(bos))])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    stop = {m[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if isinstance(m.get(k), int)}
    stop |= {i for i, t in enumerate(tokens) if t in ("<|im_end|>", "<|eot_id|>", "<|end|>") and types[i] == 3}
    return TextTokenizer(backend, m.get("tokenizer.chat_template"), sorted(stop), bos, eos)
