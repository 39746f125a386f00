"""The typed config: every key declared in the schema, every bad input one ``error:`` line before any process group."""

import ast
import re
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import curry_train
from curry_train.__main__ import main
from curry_train.conf.schema import Config, ModelConfig, field_docs
from curry_train.config import load_config, validate, validate_bench
from curry_train.primitives import _checks

PACKAGE = Path(curry_train.__file__).parent
GROUPS = {f.name: f.type for f in fields(Config) if is_dataclass(f.type)} | {"model": ModelConfig}

# (argv, text the one error line must contain); "{tmp}" is a fresh folder. "train" is the default command.
BAD_INPUTS = [
    (["train.min_lr_ratio=-5"], "train.min_lr_ratio must be a number in [0, 1], got -5"),
    (["train.grad_clip=-1"], "train.grad_clip must be a number >= 0 (0 = no clipping), got -1"),
    (["train.warmup_steps=-5"], "train.warmup_steps must be an integer >= 0, got -5"),
    (["+train.step=5"], "train.step is not a config key (did you mean train.steps?); train.* keys: steps, batch_size"),
    (["train.step=5"], "train.step is not a config key (did you mean train.steps?)"),
    (["+foo=1"], "foo is not a config key; top-level keys: model, seed, device, data, train"),
    (["model.n_layers=3"], "model.n_layers is not a config key (did you mean model.n_layer?)"),
    (["model=nope"], "model=nope is not a model preset; choose from moe, small, tiny"),
    (["seed=abc"], "seed must be an integer, got 'abc'"),
    (["seed=-1"], "seed must be an integer in [0, 4294967295], got -1"),
    (["train.weight_decay=abc"], "train.weight_decay must be a number, got 'abc'"),
    (["train.steps=abc"], "train.steps must be an integer, got 'abc'"),
    (["train.progress=maybe"], "train.progress must be true or false, got 'maybe'"),
    (["train.lr=-0.01"], "train.lr must be a number > 0, got -0.01"),
    (["train.lr=0"], "train.lr must be a number > 0, got 0"),
    (["train.beta2=1"], "train.beta2 must be a number in [0, 1), got 1"),
    (["train.seq_len=1000"], "train.seq_len must be an integer in [1, 128] (model.block_size=128), got 1000"),
    (["train.log_every=-1"], "train.log_every must be an integer >= 0 (0 = never), got -1"),
    (["train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps must be a positive integer"),
    (["train.grad_accum_normalization=mean"], "train.grad_accum_normalization must be one of tokens, microbatches"),
    (["train.recompute=half"], "train.recompute must be false, true (= full) or one of"),
    (["train.metrics_file={tmp}/no/such/dir/m.jsonl"], "train.metrics_file='{tmp}/no/such/dir/m.jsonl': folder"),
    (["device=gpu"], "device must be one of auto, cpu, cuda, got 'gpu'"),
    (["device=cuda"], "device=cuda but torch.cuda.is_available() is False"),
    (["data.path={tmp}/empty.txt"], "data.path='{tmp}/empty.txt' gives 0 bytes"),
    (["data.path={tmp}/missing.txt"], "data.path='{tmp}/missing.txt': no such file"),
    (["data.max_bytes=100"], "data.max_bytes=100 gives 100 bytes (90 for training"),
    (["data.val_fraction=1.5"], "data.val_fraction must be a number in [0, 1), got 1.5"),
    (["data.min_len=0"], "data.min_len must be a positive integer, got 0"),
    (["data.variable_length=true", "data.min_len=500"], "data.min_len must be an integer in [1, 128]"),
    (["checkpoint.every=-1"], "checkpoint.every must be an integer >= 0 (0 = never save), got -1"),
    (["checkpoint.every=5"], "checkpoint.every=5 needs checkpoint.dir"),
    (["checkpoint.keep_last=-1"], "checkpoint.keep_last must be an integer >= 0 (0 keeps every checkpoint), got -1"),
    (["bench.repeats=0"], "bench.repeats must be a positive integer, got 0"),
    (["bench.steps_per_repeat=0"], "bench.steps_per_repeat must be a positive integer, got 0"),
    (["bench.burn_in=-1"], "bench.burn_in must be an integer >= 0, got -1"),
    (["parallel.tp=2"], "world size 1 is not divisible by parallel.pp*cp*tp = 1*1*2 = 2"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel=true splits tensor-parallel activations and "
                                          "needs parallel.tp > 1, got parallel.tp=1"),
    (["parallel.cp=2"], "world size 1 is not divisible by parallel.pp*cp*tp = 1*2*1 = 2"),
    (["parallel.dp=-2"], "parallel.dp must be a positive integer or -1"),
    (["parallel.order=pp-dp-tp"], "parallel.order='pp-dp-tp' must name each of pp, dp, cp, tp exactly once"),
    (["parallel.sharding=full"], "parallel.sharding=full shards over data-parallel ranks: launch with `torchrun"),
    (["parallel.pp_schedule=zigzag"], "parallel.pp_schedule: unknown pipeline schedule kind 'zigzag'"),
    (["parallel.n_microbatches=0"], "parallel.n_microbatches must be a positive integer, got 0"),
    (["parallel.pp_stages_per_rank=0"], "parallel.pp_stages_per_rank must be a positive integer or null"),
    (["parallel.layers_per_stage=[1,-1]"], "parallel.layers_per_stage must be a list of integers >= 0"),
    (["parallel.layers_per_stage=[a]"], "parallel.layers_per_stage must be a list of integers or null, got '[a]'"),
    (["parallel.pp=2"], "world size 1 is not divisible by parallel.pp*cp*tp = 2*1*1 = 2"),
    (["train.lr=["], "cannot parse the override 'train.lr=['"),
    (["bench", "loop", "bench.repeats=0"], "bench.repeats must be a positive integer, got 0"),
    (["bench", "ga", "train.batch_size=6"],
     "train.batch_size must be a multiple of 4 for `bench ga`, which splits it into K=4 micro-batches, got 6"),
    (["bench", "sharding", "bench.world_sizes=[2,4]", "train.batch_size=6"],
     "train.batch_size must be a multiple of 4 for `bench sharding`"),
    (["bench", "pipeline", "bench.pipeline_batch_size=12"], "bench.pipeline_batch_size must be a multiple of 8"),
    (["config", "train.steps=abc"], "train.steps must be an integer, got 'abc'"),
    (["scaffold", "{tmp}/empty.txt"], "{tmp}/empty.txt is a file; scaffold needs a new or empty folder"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_error_line_before_any_process_group(argv, message, tmp_path, capsys, no_launch):
    (tmp_path / "empty.txt").write_text("")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] not in ("train", "bench", "config", "scaffold"):
        argv = ["train", *argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_cli_error_is_one_line_in_a_new_process():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "curry_train", "train", "+train.step=5"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: train.step is not a config key") and len(out.stderr.splitlines()) == 1


# -- the schema declares every key the package reads ---------------------------------------------------------------

def _group(node, aliases):
    """``cfg.train`` / ``cfg["train"]`` / an alias of one -> "train"; else None."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cfg":
        return node.attr if node.attr in GROUPS else None
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "cfg":
        key = node.slice.value if isinstance(node.slice, ast.Constant) else None
        return key if key in GROUPS else None
    return None


def _literal(node):
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def keys_read(source: str) -> set[tuple[str | None, str]]:
    """(group, key) for every config key ``source`` reads; group None = read through a getter of an unknown mapping.

    Reads: ``cfg.G.k``, ``cfg["G"]["k"]``, ``X.k`` / ``X["k"]`` / ``X.get("k")`` / ``getattr(X, "k")`` where
    ``X = cfg.G`` in the same function, ``get("k")`` where ``get = config_getter(...)``, ``config_get(X, "k")``;
    top-level ``cfg.k`` in functions that also read a group."""
    reads = set()
    for func in [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        aliases, getters, called = {}, {}, set()
        nodes = list(ast.walk(func))
        for node in nodes:
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], (ast.Name, ast.Tuple)):
                target, value = node.targets[0], node.value
                pairs = zip(target.elts, value.elts) if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) \
                    else [(target, value)]
                for name, val in pairs:
                    if isinstance(name, ast.Name) and _group(val, aliases):
                        aliases[name.id] = _group(val, aliases)
                    is_getter = isinstance(val, ast.Call) and getattr(val.func, "id", "") == "config_getter"
                    if isinstance(name, ast.Name) and is_getter:
                        getters[name.id] = _group(val.args[0], aliases)
            if isinstance(node, ast.Call):
                called.add(id(node.func))
        uses_group = False
        for node in nodes:
            if isinstance(node, ast.Attribute) and id(node) not in called and _group(node.value, aliases):
                reads.add((_group(node.value, aliases), node.attr))
                uses_group = True
            if isinstance(node, ast.Subscript) and _group(node.value, aliases) and _literal(node.slice):
                reads.add((_group(node.value, aliases), _literal(node.slice)))
            if isinstance(node, ast.Call) and node.args and _literal(node.args[0]):
                f = node.func
                if isinstance(f, ast.Name) and f.id in getters:
                    reads.add((getters[f.id], _literal(node.args[0])))
                if isinstance(f, ast.Attribute) and f.attr == "get" and _group(f.value, aliases):
                    reads.add((_group(f.value, aliases), _literal(node.args[0])))
            if isinstance(node, ast.Call) and len(node.args) >= 2 and _literal(node.args[1]):
                name = getattr(node.func, "id", "")
                if name == "config_get" or (name == "getattr" and _group(node.args[0], aliases)):
                    reads.add((_group(node.args[0], aliases), _literal(node.args[1])))
        if uses_group:
            for node in nodes:
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cfg" \
                        and node.attr not in GROUPS and id(node) not in called:
                    reads.add(("", node.attr))
    return reads


def test_every_key_the_package_reads_is_declared():
    declared = {g: {f.name for f in fields(schema)} for g, schema in GROUPS.items()}
    declared[""] = {f.name for f in fields(Config)}
    every_key = set().union(*declared.values())
    every_key |= {f.name for schema in GROUPS.values() for g in fields(schema) if is_dataclass(g.type)
                  for f in fields(g.type)}  # nested groups (train.spike.*), read through a primitive's from_config
    reads = set()
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        reads |= keys_read(source)
        # the plain regex too (it also sees docstrings): cfg.<group>.<key>, not followed by a call
        reads |= {(g, k) for g, k in re.findall(r"cfg\.(train|parallel|data|checkpoint|bench|model)\.([a-z_][a-z0-9_]*)"
                                                 r"\b(?!\()", source)}
    undeclared = sorted(f"{g or '?'}.{k}" for g, k in reads if k not in (declared[g] if g is not None else every_key))
    assert not undeclared, f"keys read but not declared in conf/schema.py: {undeclared}"
    # the scan sees the reads it must see (plain, through an alias, through a getter, through getattr)
    for expected in [("train", "lr"), ("bench", "pipeline_batch_size"), ("parallel", "pp_stages_per_rank"),
                     ("parallel", "layers_per_stage"), ("train", "compile"), ("", "seed"), ("checkpoint", "every")]:
        assert expected in reads, expected


def test_the_scan_finds_reads_in_every_form():
    source = '''
def f(cfg):
    t, b = cfg.train, cfg["bench"]
    get = config_getter(cfg.parallel)
    return (cfg.data.path, t.steps, b["repeats"], get("pp"), getattr(t, "compile", 0), config_get(cfg.model, "name"),
            cfg.seed, cfg.model.get("vocab_size"), t.items())
'''
    assert keys_read(source) == {("data", "path"), ("train", "steps"), ("bench", "repeats"), ("parallel", "pp"),
                                 ("train", "compile"), ("model", "name"), ("", "seed"), ("model", "vocab_size")}


# -- the good paths ------------------------------------------------------------------------------------------------

def test_default_config_is_typed_strict_and_valid():
    cfg = load_config()
    validate(cfg, 1)
    assert OmegaConf.get_type(cfg) is Config and OmegaConf.get_type(cfg.model) is ModelConfig
    assert OmegaConf.is_struct(cfg) and all(OmegaConf.is_struct(cfg[g]) for g in GROUPS)
    assert cfg.parallel.pp_stages_per_rank is None and cfg.parallel.layers_per_stage is None


def test_model_small_and_pipeline_keys():
    cfg = load_config(["model=small", "parallel.pp_stages_per_rank=2", "parallel.layers_per_stage=[1,2,3]"])
    assert cfg.model.name == "small" and cfg.model.n_embd == 384 and OmegaConf.get_type(cfg.model) is ModelConfig
    assert cfg.parallel.pp_stages_per_rank == 2 and list(cfg.parallel.layers_per_stage) == [1, 2, 3]
    validate(load_config(["model=small"]), 1)


def test_every_field_has_a_docstring():
    for schema in [Config, *GROUPS.values()]:
        missing = [f.name for f in fields(schema) if f.name not in field_docs(schema) and f.name not in GROUPS]
        assert not missing, f"{schema.__name__}: fields without a docstring: {missing}"


def test_config_command_prints_every_key_with_its_doc(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)
    assert printed == OmegaConf.to_container(load_config(), resolve=True)
    assert set(printed) == {f.name for f in fields(Config)}
    for group, schema in GROUPS.items():
        assert set(printed[group]) == {f.name for f in fields(schema)}
    assert re.search(r"^  min_lr_ratio: 0.1 +# Cosine decays to lr \* min_lr_ratio at the last step; in \[0, 1\]\.$",
                     out, re.M)


def test_validate_bench_reads_the_split_from_the_benches_parameters():
    cfg = load_config(["train.batch_size=12"])
    validate_bench(cfg, ["ga"], {"ga": {"k": 4}})
    validate_bench(cfg, ["ga", "loop"], {"ga": {"k": 3}, "loop": {}})
    with pytest.raises(ValueError, match=r"^train.batch_size must be a multiple of 8 for `bench sharding`, which "
                                         r"splits it over 2 and 8 ranks, got 12$"):
        validate_bench(cfg, ["sharding"], {"sharding": {"world_sizes": (2, 8)}})


# -- the checkers ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("check,args,message", [
    (_checks.positive_int, ("steps", 0), "steps must be a positive integer, got 0"),
    (_checks.positive_int, ("steps", True), "steps must be a positive integer, got True"),
    (_checks.positive_int, ("every_n", 2.0, "(1 = every block)"),
     "every_n must be a positive integer (1 = every block), got 2.0"),
    (_checks.non_negative_int, ("burn_in", -1), "burn_in must be an integer >= 0, got -1"),
    (_checks.integer, ("seed", 2**32, 0, 2**32 - 1), "seed must be an integer in [0, 4294967295], got 4294967296"),
    (_checks.positive_float, ("lr", float("nan")), "lr must be a finite number > 0, got nan"),
    (_checks.non_negative_float, ("grad_clip", "1"), "grad_clip must be a number >= 0, got '1'"),
    (_checks.fraction, ("dropout", 1.0, 0.0, 1.0, False), "dropout must be a number in [0, 1), got 1.0"),
    (_checks.choice, ("mode", 1, (True, "full")), "mode must be one of True, full, got 1"),
    (_checks.boolean, ("progress", "yes"), "progress must be true or false, got 'yes'"),
])
def test_checkers_raise_one_line(check, args, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check(*args)


def test_checkers_return_the_value_and_prefixed_names_the_group():
    assert _checks.positive_int("steps", 3) == 3 and _checks.fraction("f", 1) == 1.0
    assert _checks.choice("m", None, (None, "bf16")) is None
    with pytest.raises(ValueError, match=r"^train.steps must be a positive integer, got 0$"):
        with _checks.prefixed("train."):
            _checks.positive_int("steps", 0)


def test_a_bench_out_dir_that_is_a_file_names_the_key(tmp_path, capsys, no_launch):
    (tmp_path / "results").write_text("not a folder")
    for out in (tmp_path / "results", tmp_path / "results" / "sub"):
        assert main(["bench", "ga", f"bench.out_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: bench.out_dir='{out}': '{tmp_path / 'results'}' is a file, not a folder")
        assert err.count("\n") == 1
