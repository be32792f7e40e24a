"""Strict YAML config: unknown keys, types, choices, --set overrides, sweeps, validation."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from hpcattn import config as C
from hpcattn.errors import ConfigError, HpcattnError


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def load_text(tmp_path, text: str, overrides=None) -> C.Config:
    return C.load(str(write(tmp_path, text)), overrides)


# ------------------------------------------------------------------------------------------------
# loading


def test_defaults_and_simple_file(tmp_path):
    cfg = C.load(None)
    assert cfg == C.Config()
    cfg = load_text(tmp_path, """
        job: prefill
        methods: [local, ring]
        shape:
          batch: 2
          context: 1024
          dtype: float32
          causal: false
          scale: 1          # an int is accepted for a float field
        ring:
          layout: contiguous
    """)
    assert cfg.job == "prefill" and cfg.methods == ["local", "ring"]
    assert cfg.shape.batch == 2 and cfg.shape.context == 1024 and cfg.shape.dtype == "float32"
    assert cfg.shape.causal is False
    assert cfg.shape.scale == 1.0 and isinstance(cfg.shape.scale, float)
    assert cfg.ring.layout == "contiguous"
    assert cfg.shape.heads_q == C.ShapeConfig().heads_q          # untouched default


def test_empty_file_and_null_section_give_defaults(tmp_path):
    assert load_text(tmp_path, "") == C.Config()
    assert load_text(tmp_path, "shape:\n") == C.Config()


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        C.load(str(tmp_path / "nope.yaml"))
    p = write(tmp_path, "shape: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        C.load(str(p))
    assert str(p) in str(e.value)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_text(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="shape"):
        load_text(tmp_path, "shape: 3\n")


def test_unknown_key_names_key_file_and_close_match(tmp_path):
    p = write(tmp_path, "shape:\n  contxt: 4096\n")
    with pytest.raises(ConfigError) as e:
        C.load(str(p))
    msg = str(e.value)
    assert "shape.contxt" in msg
    assert str(p) in msg
    assert "context" in msg and "did you mean" in msg


def test_unknown_top_level_key(tmp_path):
    p = write(tmp_path, "methds: [local]\n")
    with pytest.raises(ConfigError) as e:
        C.load(str(p))
    assert "'methds'" in str(e.value) and "methods" in str(e.value) and str(p) in str(e.value)


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_text(tmp_path, "tree:\n  zzzzzz: 1\n")
    msg = str(e.value)
    assert "tree.zzzzzz" in msg and "valid keys" in msg
    assert "reduction" in msg and "topology" in msg


@pytest.mark.parametrize("text,key", [
    ('shape:\n  batch: "x"\n', "shape.batch"),
    ("shape:\n  batch: 2.5\n", "shape.batch"),
    ("shape:\n  batch: true\n", "shape.batch"),        # bool is not an int here
    ("shape:\n  causal: 3\n", "shape.causal"),
    ('shape:\n  causal: "yes please"\n', "shape.causal"),
    ("shape:\n  scale: abc\n", "shape.scale"),
    ("shape:\n  lengths: 5\n", "shape.lengths"),
    ("shape:\n  lengths: [1, x]\n", "shape.lengths[1]"),
    ("run:\n  check: 1\n", "run.check"),
    ("methods: local\n", "methods"),
    ("job: 3\n", "job"),
])
def test_wrong_type_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        load_text(tmp_path, text)
    assert key in str(e.value)
    assert "expected" in str(e.value)


@pytest.mark.parametrize("text,key,bad", [
    ("shape:\n  dtype: float8\n", "shape.dtype", "float8"),
    ("job: train\n", "job", "train"),
    ("comm:\n  backend: ucx\n", "comm.backend", "ucx"),
    ("tree:\n  reduction: [allreduce, scatter]\n", "tree.reduction", "scatter"),
    ("kernel:\n  backend: fa4\n", "kernel.backend", "fa4"),
])
def test_invalid_choice(tmp_path, text, key, bad):
    with pytest.raises(ConfigError) as e:
        load_text(tmp_path, text)
    msg = str(e.value)
    assert key in msg and bad in msg and "is not one of" in msg


def test_config_error_is_user_facing():
    assert issubclass(ConfigError, HpcattnError)


# ------------------------------------------------------------------------------------------------
# --set overrides


def test_set_dotted_overrides(tmp_path):
    cfg = load_text(tmp_path, "shape:\n  context: 100\n",
                    ["shape.context=65536", "tree.reduction=allreduce", "run.check=false",
                     "shape.scale=0.5", "inputs.path=/tmp/x.h5", "shape.lengths=[1, 2]"])
    assert cfg.shape.context == 65536
    assert cfg.tree.reduction == "allreduce"
    assert cfg.run.check is False
    assert cfg.shape.scale == 0.5
    assert cfg.inputs.path == "/tmp/x.h5"
    assert cfg.shape.lengths == [1, 2]


def test_set_bare_unique_leaf_name():
    cfg = C.load(None, ["context=65536", "reduction=allreduce", "layout=contiguous", "repeats=3"])
    assert cfg.shape.context == 65536
    assert cfg.tree.reduction == "allreduce"
    assert cfg.ring.layout == "contiguous"
    assert cfg.run.repeats == 3
    with pytest.raises(C.ConfigError, match="ambiguous, use one of apb.seed, inputs.seed, model.seed"):
        C.load(None, ["seed=7"])


def test_set_override_wins_over_file(tmp_path):
    cfg = load_text(tmp_path, "shape:\n  batch: 4\n", ["batch=2"])
    assert cfg.shape.batch == 2


def test_set_ambiguous_leaf():
    with pytest.raises(ConfigError) as e:
        C.load(None, ["backend=mpi"])
    msg = str(e.value)
    assert "ambiguous" in msg and "comm.backend" in msg and "kernel.backend" in msg


def test_set_unknown_key_with_suggestion():
    with pytest.raises(ConfigError) as e:
        C.load(None, ["shape.contxt=5"])
    assert "shape.contxt" in str(e.value) and "shape.context" in str(e.value)
    with pytest.raises(ConfigError, match="unknown key 'nonsense_key'"):
        C.load(None, ["nonsense_key=1"])


def test_set_type_checked_and_malformed():
    with pytest.raises(ConfigError, match="shape.context"):
        C.load(None, ["context=big"])
    with pytest.raises(ConfigError, match="shape.dtype"):
        C.load(None, ["dtype=float8"])
    with pytest.raises(ConfigError, match="key=value"):
        C.load(None, ["shape.context"])


def test_set_sweep_list_on_command_line():
    cfg = C.load(None, ["context=[1024, 2048]"])
    assert cfg.shape.context == [1024, 2048]
    assert C.sweep_axes(cfg) == {"shape.context": [1024, 2048]}


# ------------------------------------------------------------------------------------------------
# sweeps


def test_sweep_expands_cartesian_product(tmp_path):
    cfg = load_text(tmp_path, """
        shape:
          context: [1024, 4096, 16384]
          dtype: [float32, bfloat16]
        tree:
          reduction: [allreduce, allgather]
    """)
    axes = C.sweep_axes(cfg)
    assert axes == {"shape.context": [1024, 4096, 16384], "shape.dtype": ["float32", "bfloat16"],
                    "tree.reduction": ["allreduce", "allgather"]}
    cases = list(C.expand_cases(cfg))
    assert len(cases) == 3 * 2 * 2
    points = [(p["shape.context"], p["shape.dtype"], p["tree.reduction"]) for p, _ in cases]
    assert len(set(points)) == 12
    assert set(points) == {(c, t, r) for c in (1024, 4096, 16384) for t in ("float32", "bfloat16")
                           for r in ("allreduce", "allgather")}
    for point, concrete in cases:
        assert concrete.shape.context == point["shape.context"]
        assert concrete.shape.dtype == point["shape.dtype"]
        assert concrete.tree.reduction == point["tree.reduction"]
        assert C.sweep_axes(concrete) == {}                  # fully concrete
        assert concrete.shape.batch == cfg.shape.batch        # other fields carried over
        C.validate(concrete, world_size=2, cuda_available=False)
    # expansion does not mutate the swept config
    assert cfg.shape.context == [1024, 4096, 16384]


def test_no_sweep_yields_one_case():
    cfg = C.load(None)
    cases = list(C.expand_cases(cfg))
    assert len(cases) == 1
    point, concrete = cases[0]
    assert point == {} and concrete == cfg


def test_list_in_non_sweepable_field_is_error(tmp_path):
    with pytest.raises(ConfigError, match="inputs.seed"):
        load_text(tmp_path, "inputs:\n  seed: [1, 2]\n")
    with pytest.raises(ConfigError, match="run.repeats"):
        load_text(tmp_path, "run:\n  repeats: [1, 2]\n")
    with pytest.raises(ConfigError, match="comm.backend"):
        load_text(tmp_path, "comm:\n  backend: [mpi, gloo]\n")


def test_empty_sweep_list_is_error(tmp_path):
    with pytest.raises(ConfigError, match="shape.context.*empty"):
        load_text(tmp_path, "shape:\n  context: []\n")


def test_sweep_list_elements_type_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"shape.context\[1\]"):
        load_text(tmp_path, "shape:\n  context: [1024, lots]\n")


# ------------------------------------------------------------------------------------------------
# validation of concrete configs


def cfg_with(*overrides) -> C.Config:
    return C.load(None, list(overrides))


def test_default_config_is_valid():
    C.validate(C.Config(), world_size=4, cuda_available=False)
    C.validate(C.Config(), world_size=4, cuda_available=True)


@pytest.mark.parametrize("overrides,world,cuda,pattern", [
    (["heads_q=12", "heads_kv=8"], 2, False, r"heads_q \(12\) must be a multiple of shape.heads_kv \(8\)"),
    (["job=prefill", "methods=[local, ring]", "context=4100", "layout=zigzag"], 4, False,
     r"zigzag.*divisible by 2 x ranks = 8.*4100"),
    (["job=prefill", "methods=[local, ring]", "context=3", "layout=contiguous"], 4, False,
     r"context=3 < 4 ranks"),
    (["comm.backend=nccl"], 2, False, r"nccl needs GPUs"),
    (["lengths=[10, 20]", "batch=3"], 2, False, r"lengths has 2 entries, expected shape.batch = 3"),
    (["lengths=[10, 5000]", "batch=2", "context=4096"], 2, False, r"lengths entries"),
    (["job=prefill", "methods=[local, ring]", "lengths=[10]"], 2, False, r"is for job: decode"),
    (["methods=[local, tre]"], 2, False, r"'tre' is not a decode method.*did you mean tree"),
    (["job=prefill", "methods=[local, tree]"], 2, False, r"'tree' is not a prefill method"),
    (["methods=[]"], 2, False, r"at least one method"),
    (["methods=[tree, tree]"], 2, False, r"twice"),
    (["run.device=cuda"], 2, False, r"no CUDA GPU"),
    (["dtype=float16"], 2, False, r"float16 is not supported on CPU"),
    (["kernel.backend=aten_flash"], 2, False, r"needs a GPU"),
    (["batch=0"], 2, False, r"shape.batch must be >= 1"),
    (["context=0"], 2, False, r"shape.context must be >= 1"),
    (["repeats=0"], 2, False, r"run.repeats"),
    (["inputs.source=file"], 2, False, r"needs inputs.path"),
    (["inputs.source=file", "inputs.path=/definitely/not/here.h5"], 2, False, r"file not found"),
    (["job=generate", "generate.prompt_logits=true"], 2, False,
     r"generate.prompt_logits=true needs run.save_outputs=true"),
    (["job=generate", "generate.prompt_logits=true", "run.save_outputs=true", "generate.decode=lamina"], 3, False,
     r"generate.prompt_logits is not supported with generate.decode=lamina"),
])
def test_validate_errors(overrides, world, cuda, pattern):
    cfg = cfg_with(*overrides)
    with pytest.raises(ConfigError, match=pattern):
        C.validate(cfg, world_size=world, cuda_available=cuda)


def test_validate_accepts_the_fixed_versions():
    C.validate(cfg_with("heads_q=16", "heads_kv=8"), 2, False)
    C.validate(cfg_with("job=prefill", "methods=[local, ring]", "context=4104", "layout=zigzag"), 4, False)
    C.validate(cfg_with("job=prefill", "methods=[local, ring]", "context=4100", "layout=contiguous"),
               4, False)
    C.validate(cfg_with("comm.backend=nccl"), 2, True)
    C.validate(cfg_with("lengths=[10, 0, 4096]", "batch=3", "context=4096"), 2, False)
    # the zigzag/ranks checks only apply to ring prefill on more than one rank
    C.validate(cfg_with("job=prefill", "methods=[local, ring]", "context=3"), 1, False)
    C.validate(cfg_with("job=prefill", "methods=[local]", "context=3"), 4, False)


def test_validate_names_the_source():
    with pytest.raises(ConfigError, match="^my.yaml: "):
        C.validate(cfg_with("heads_q=3", "heads_kv=2"), 1, False, source="my.yaml")


# ------------------------------------------------------------------------------------------------
# round trip


def test_to_yaml_from_dict_round_trip(tmp_path):
    cfg = cfg_with("job=prefill", "methods=[local, ring]", "context=[1024, 2048]", "dtype=float32",
                   "scale=0.25", "lengths=[3, 4]", "inputs.path=/x.h5", "ranks_per_node=2",
                   "causal=false")
    text = C.to_yaml(cfg)
    again = C.from_dict(yaml.safe_load(text))
    assert again == cfg
    # and through a file with load()
    p = tmp_path / "resolved.yaml"
    p.write_text(text)
    assert C.load(str(p)) == cfg
    # each expanded case round-trips too (what the HDF5 record stores)
    for _, concrete in C.expand_cases(cfg):
        assert C.from_dict(yaml.safe_load(C.to_yaml(concrete))) == concrete


def test_from_dict_is_strict():
    d = C.to_dict(C.Config())
    d["shape"]["bogus"] = 1
    with pytest.raises(ConfigError, match="shape.bogus"):
        C.from_dict(d)


def test_leaf_paths_and_reference_text_cover_every_field():
    leaves = C.leaf_paths()
    assert "shape.context" in leaves and "tree.reduction" in leaves and "job" in leaves
    text = C.reference_text()
    for path in leaves:
        assert f"`{path}`" in text


def test_auto_true_false_fields_accept_yaml_booleans(tmp_path):
    cfg = C.load(None, ["comm.gpu_aware_mpi=true"])
    assert cfg.comm.gpu_aware_mpi == "true"
    assert load_text(tmp_path, "comm: {gpu_aware_mpi: false}\n").comm.gpu_aware_mpi == "false"
