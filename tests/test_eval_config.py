"""job: eval settings: one clear error line per bad setting, before anything runs."""

from __future__ import annotations

import pytest

from hpcattn import config as C
from hpcattn.errors import ConfigError


def _eval_cfg(tmp_path, *sets):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")                      # validation looks at the path only
    return C.load("configs/eval_ruler.yaml", [f"model.path={gguf}", "generate.prefill=local",
                                               "generate.decode=local", *sets])


@pytest.mark.parametrize("sets,message", [
    (["eval.tasks=[niah_single,passkey]"], r"eval.tasks: \['passkey'\]: choose from niah_single, "),
    (["eval.samples=0"], r"eval.samples \(0\) and eval.batch_size \(1\) must be >= 1"),
    (["eval.max_new_tokens=0"], r"eval.max_new_tokens must be >= 1 or null"),
    (["eval.depths=[50,120]"], r"eval.depths must list percentages in \[0, 100\]"),
    (["generate.prompt_text=hello"], r"job eval makes its own prompts"),
    (["generate.decode=lamina"], r"job eval runs generate.decode local, tree or ring"),
])
def test_eval_config_errors(tmp_path, sets, message):
    cfg = _eval_cfg(tmp_path, *sets)
    with pytest.raises(ConfigError, match=message):
        C.validate(cfg, 1, False, "e.yaml")


def test_eval_needs_a_tokenizer(tmp_path):
    cfg = _eval_cfg(tmp_path)
    C.validate(cfg, 1, False, "e.yaml")           # a .gguf file carries its tokenizer
    (tmp_path / "ck").mkdir()
    cfg.model.path = str(tmp_path / "ck")
    with pytest.raises(ConfigError, match=r"job eval needs model.path with a tokenizer"):
        C.validate(cfg, 1, False, "e.yaml")
    cfg.model.path = str(tmp_path / "missing.gguf")
    with pytest.raises(ConfigError, match=r"model.path: GGUF file not found"):
        C.validate(cfg, 1, False, "e.yaml")


@pytest.mark.parametrize("row, label", [
    (dict(method="local+local", variant="", world_size=1, exact=True, context=1024), "exact (one process)"),
    (dict(method="ring+tree", prefill="ring", variant="zigzag/allreduce", world_size=4, exact=True, context=1024),
     "ring (exact)"),
    (dict(method="star+tree", prefill="star", variant="blockauto-anchorblock/allreduce", world_size=4, exact=False,
          context=2048, query_len=64), "Star, anchor = block"),
    (dict(method="star+tree", prefill="star", variant="blockauto-anchor124/allreduce", world_size=4, exact=False,
          context=2048, query_len=64), "Star, anchor = block/4"),
    (dict(method="star+tree", prefill="star", variant="blockauto-anchor100/allreduce", world_size=4, exact=False,
          context=2048, query_len=64), "Star, anchor = 100 tokens"),
    (dict(method="apb+tree", prefill="apb", variant="la124-lp62-query_aware/allreduce", world_size=4, exact=False,
          context=2048), "APB, query_aware"),
])
def test_accuracy_plot_series_label(row, label):
    """The accuracy plot's series stay one line across contexts: the lengths that follow the
    context (Star's anchor in tokens, APB's la/lp) become their rule."""
    from hpcattn.results.accuracy import series_label

    assert series_label(row) == label
