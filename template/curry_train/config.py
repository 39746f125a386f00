"""The Hydra config: compose the typed schema with command-line overrides, refuse unknown keys, validate every value.

Schema: ``conf/schema.py``, one dataclass per group with a docstring per field (``Config``, ``TrainConfig``...),
registered in Hydra's ``ConfigStore``. ``conf/config.yaml`` starts from it, and each ``conf/model/*.yaml`` preset
extends the GPT model schema (``ModelConfig``). ``Config.model`` is untyped so that a preset with another schema
can sit beside the GPT ones; the preset's own schema types it. The user's own model is the untyped preset
``custom`` (``conf/model/custom.yaml``): ``model._target_=pkg.module.factory`` selects it, and every other
``model.KEY=VALUE`` becomes a keyword argument of the factory (``user_model.user_overrides``: added with ``++``,
so no ``+`` is needed); ``train.loss.KEY=VALUE`` likewise. Those keys are checked against the factory's signature
instead (``user_model.check_model``).

``load_config(overrides)`` composes with Hydra's compose API (no working-directory change, no ``outputs/``):
the result is in struct mode and typed, so ``train.steps=abc`` and ``train.step=5`` fail, and so does
``+train.step=5`` (Hydra lets ``+`` add keys; ``check_keys`` refuses any key the schema does not declare).
Every Hydra/OmegaConf error comes out as one ``ValueError`` line naming the key and what is allowed.

``validate(cfg, world_size)`` checks every value, and how values fit together (rank grid, batch splits,
pipeline schedule), *before* a process group starts: bad input fails in one process with one message instead
of hanging N; a user's model is built once on CPU and tried on a 1 x 2 batch (``user_model.check_model``). The
``parallel.*`` half lives in ``config_parallel`` (re-exported here). ``validate_bench`` adds what the selected benches need. This module imports no runtime module
(train, loop, parallelize, bench): only the primitives' checks, ``data``'s batch split and the model builder
``user_model``.
"""

import re
from dataclasses import fields, is_dataclass
from difflib import get_close_matches
from math import lcm
from pathlib import Path
from typing import List, Union, get_args, get_origin

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .conf.schema import Config, ModelConfig, field_docs, register
from .data import check_text_file
from .prepared_data import open_prepared
from .tokenizer import check_vocab, load_tokenizer
from .primitives import GradientAccumulation
from .primitives._checks import (boolean, choice, fraction, integer, non_negative_float, non_negative_int,
                                 positive_float, positive_int, prefixed)
from .primitives.distributed_optimizer import check_options
from .primitives.loss_spike import LossSpikeWatchdog
from .primitives.recompute import parse_recompute
from .user_model import USER_PRESET, ModelInfo, check_model, user_overrides, user_target
from .config_parallel import (  # noqa: F401  (re-exported: callers import them from here)
    check_context_parallel_config, check_parallel, check_parallelize_config, check_tensor_parallel_config,
    data_parallel_size, model_shapes, pipeline_settings,
)

CONF_DIR = Path(__file__).parent / "conf"
DEVICES = ("auto", "cpu", "cuda")
SCHEMAS = {"": Config, "model": ModelConfig}  # where the field type does not say it (``model: Any``): for messages
register()


# -- composition ------------------------------------------------------------------------------------------------

def load_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with ``overrides``; any error is one ``ValueError`` line naming the key."""
    overrides = user_overrides(list(overrides or []))
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ValueError(_one_line(e, overrides)) from e
    check_keys(cfg)
    return cfg


def schema_at(path: str):
    """The dataclass that declares the keys under ``path`` (``""`` = top level, ``"train"``...), or None."""
    if path in SCHEMAS:
        return SCHEMAS[path]
    group, _, key = path.rpartition(".")
    parent = schema_at(group)
    schema = {f.name: f.type for f in fields(parent)}.get(key) if parent else None
    return schema if is_dataclass(schema) else None


def check_keys(cfg, path: str = "") -> None:
    """Every key under ``cfg`` is declared by its node's schema: ``+train.step=5`` is refused like ``train.step=5``.

    A node typed by a dataclass (every group, and a model preset that extends ``model_schema/gpt``) is checked
    against its fields; an untyped model preset (``custom``) is left to its own checks (``user_model.check_model``)."""
    schema = OmegaConf.get_type(cfg) if path else Config
    declared = {f.name for f in fields(schema)} if is_dataclass(schema) else set(cfg)
    for key in cfg:
        full_key = f"{path}.{key}" if path else str(key)
        if key not in declared:
            raise ValueError(unknown_key_message(full_key, schema))
        if OmegaConf.is_missing(cfg, key):
            raise ValueError(f"{full_key} has no value (???); set it, e.g. {full_key}=...")
        if isinstance(cfg[key], DictConfig):
            check_keys(cfg[key], full_key)


def unknown_key_message(full_key: str, schema=None) -> str:
    group, _, key = full_key.rpartition(".")
    schema = schema or schema_at(group)
    known = [f.name for f in fields(schema)] if schema else []
    close = get_close_matches(key, known, n=1)
    hint = f" (did you mean {group + '.' if group else ''}{close[0]}?)" if close else ""
    where = f"{group}.* keys" if group else "top-level keys"
    return f"{full_key} is not a config key{hint}; {where}: {', '.join(known)}"


NOUNS = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans"),
         str: ("a string", "strings")}


def describe_type(annotation) -> str:
    """``int`` -> "an integer", ``Optional[List[int]]`` -> "a list of integers or null"..."""
    if get_origin(annotation) is Union:
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return f"{describe_type(inner[0])} or null"
    if get_origin(annotation) in (list, List):
        return f"a list of {NOUNS.get(get_args(annotation)[0], ('', 'values'))[1]}"
    if is_dataclass(annotation):
        return f"a group of keys ({', '.join(f.name for f in fields(annotation))})"
    return NOUNS.get(annotation, ("a value",))[0]


def _one_line(e: Exception, overrides: list[str]) -> str:
    """Hydra's and OmegaConf's multi-line errors (``full_key: ... object_type=...``) as one line naming the key."""
    def given(key):  # the value the user typed for ``key``, if an override set it
        return next((o.split("=", 1)[1] for o in overrides if "=" in o and o.lstrip("+~").split("=")[0] == key), None)

    if isinstance(e, MissingConfigException) and e.options is not None:
        group = (e.missing_cfg_file or "").split("/")[0]
        options = sorted(o for o in e.options if not (group == "model" and o == USER_PRESET))
        own = " (or your own: model._target_=pkg.module.factory)" if group == "model" else ""
        return f"{group}={given(group)} is not a {group} preset; choose from {', '.join(options)}{own}"
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    key = (getattr(cause, "full_key", None) or "").split("[")[0]
    kind = type(cause).__name__
    if key and kind in ("ConfigAttributeError", "ConfigKeyError"):
        return unknown_key_message(key)
    group, _, name = key.rpartition(".")
    annotation = {f.name: f.type for f in fields(schema_at(group))}.get(name) if key and schema_at(group) else None
    if kind == "ValidationError" and annotation is not None and given(key) is not None:
        return f"{key} must be {describe_type(annotation)}, got {given(key)!r}"
    if isinstance(e, OverrideParseException):
        return f"cannot parse the override {e.override!r}: {str(e).strip().splitlines()[0]}"
    lines = [str(x).strip().splitlines()[0] for x in (e, cause) if str(x).strip()]
    lines = [line for line in dict.fromkeys(lines) if not line.startswith("Error merging override")] or lines
    return f"{key + ': ' if key else ''}{': '.join(lines)}"


# -- validation -------------------------------------------------------------------------------------------------

def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Raise ``ValueError`` (``FileNotFoundError`` for ``data.path``) naming the first bad key and what is allowed.

    Needs no process group: ``train`` calls it first, the CLI before any bench."""
    check_keys(cfg)
    integer("seed", cfg.seed, 0, 2**32 - 1)
    choice("device", cfg.device, DEVICES)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch.cuda.is_available() is False; use device=cpu or device=auto")
    tokenizer = _check_tokenizer(cfg)
    model = check_model(cfg, tokenizer.vocab_size)  # a user's model: built once on CPU, tried on a 1 x 2 batch
    _check_train(cfg.train, model)
    _check_data(cfg.data, cfg.train)
    _check_checkpoint(cfg.checkpoint)
    _check_spike(cfg.train.spike, cfg.checkpoint)
    _check_bench(cfg.bench)
    check_parallel(cfg, world_size, model.n_layer)
    _check_blocks(cfg, model)


def _check_blocks(cfg, model: ModelInfo) -> None:
    """Recompute and FSDP2 work block by block: asked for on a model where ``find_blocks`` finds none, refused here
    (the GPT always has blocks; a user's model may not)."""
    if model.n_layer:
        return
    sharding, _ = check_options(cfg.parallel.sharding, cfg.parallel.mixed_precision, cfg.parallel.cpu_offload)
    uses = [f"train.recompute={cfg.train.recompute}"] if parse_recompute(cfg.train.recompute) else []
    uses += [f"parallel.sharding={sharding}"] if sharding in ("shard_grad_op", "full") else []
    if uses:
        raise ValueError(f"{' and '.join(uses)} {'work' if len(uses) > 1 else 'works'} block by block, and no blocks "
                         f"were found in {model.name} "
                         "(an nn.ModuleList / nn.ModuleDict of same-class modules, e.g. model.layers, transformer.h, "
                         "layers); turn them off or keep the blocks in such a container")


def _check_train(t, model: ModelInfo) -> None:
    positive_int("train.steps", t.steps)
    positive_int("train.batch_size", t.batch_size)
    if model.context is None:
        positive_int("train.seq_len", t.seq_len)
    else:
        integer("train.seq_len", t.seq_len, 1, model.context, f"({model.context_source}={model.context})")
    with prefixed("train."):
        GradientAccumulation.from_config(t)
    positive_float("train.lr", t.lr)
    fraction("train.min_lr_ratio", t.min_lr_ratio)
    non_negative_int("train.warmup_steps", t.warmup_steps)
    non_negative_float("train.weight_decay", t.weight_decay)
    fraction("train.beta1", t.beta1, include_high=False)
    fraction("train.beta2", t.beta2, include_high=False)
    non_negative_float("train.grad_clip", t.grad_clip, "(0 = no clipping)")
    positive_int("train.nonfinite_patience", t.nonfinite_patience, "(consecutive non-finite steps that end the run)")
    non_negative_int("train.log_every", t.log_every, "(0 = never)")
    boolean("train.progress", t.progress)
    boolean("train.compile", t.compile)
    if t.metrics_file is not None:
        path = Path(str(t.metrics_file)).expanduser()
        if not path.parent.is_dir():
            raise ValueError(f"train.metrics_file={t.metrics_file!r}: folder {str(path.parent)!r} does not exist; "
                             "create it, or use a file in an existing folder")
        if path.is_dir():
            raise ValueError(f"train.metrics_file={t.metrics_file!r} is a folder; give a file path (JSON lines)")
    non_negative_int("train.eval_every", t.eval_every, "(0 = never)")
    positive_int("train.eval_batches", t.eval_batches)
    if t.tensorboard_dir is not None and Path(str(t.tensorboard_dir)).expanduser().is_file():
        raise ValueError(f"train.tensorboard_dir={t.tensorboard_dir!r} is a file; give a folder (created if missing)")
    # train.recompute / recompute_every_n: check_parallelize_config


def _check_tokenizer(cfg):
    """``data.tokenizer`` loads (a local file, never a download) and the GPT's ``model.vocab_size`` covers its ids
    (a user's model is checked by ``check_model``); ``model.init_from`` is a folder. Returns the tokenizer."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if user_target(cfg.model) is None:
        check_vocab(cfg.model.vocab_size, tokenizer)
    init_from = cfg.model.get("init_from")
    if init_from is not None and not Path(str(init_from)).expanduser().is_dir():
        raise FileNotFoundError(f"model.init_from={init_from!r}: no such folder (a Hugging Face model folder, e.g. "
                                "what `python -m curry_train export` wrote)")
    return tokenizer


def warmup_warning(t) -> str | None:
    """A warning line when ``train.warmup_steps`` > ``train.steps + 1``: the LR then never reaches ``train.lr``; it
    names the peak it does reach (on the last step: ``lr * (steps + 1) / warmup_steps``, ``loop.warmup_cosine``)."""
    peak = (t.steps + 1) / t.warmup_steps if t.warmup_steps else 1.0  # the multiplier of the last step
    if peak >= 1.0:
        return None
    return (f"warning: train.warmup_steps={t.warmup_steps} is more than train.steps={t.steps}: the LR never reaches "
            f"train.lr={t.lr}; it peaks at {t.lr * peak:.3g} ({peak:.0%} of it) on the last step. Lower "
            "train.warmup_steps to reach it")


def _check_data(d, t) -> None:
    if not isinstance(d.text_key, str) or not d.text_key:
        raise ValueError(f"data.text_key must be a non-empty string (the JSON-lines field / Parquet column), got "
                         f"{d.text_key!r}")
    positive_int("data.max_bytes", d.max_bytes)
    fraction("data.val_fraction", d.val_fraction, include_high=False)
    boolean("data.variable_length", d.variable_length)
    positive_int("data.min_len", d.min_len)
    if d.variable_length:
        integer("data.min_len", d.min_len, 1, t.seq_len, f"(train.seq_len={t.seq_len} with data.variable_length)")
    if d.prepared is not None:
        if d.path is not None:
            raise ValueError(f"data.prepared={d.prepared!r} and data.path={d.path!r}: give one (data.prepared "
                             "replaces data.path)")
        meta = open_prepared(d.prepared, d.tokenizer)  # written by data.tokenizer, every shard its recorded size
        for split in ("train", "val") if t.eval_every else ("train",):
            if meta["tokens"][split] <= t.seq_len + 1:
                raise ValueError(f"data.prepared={d.prepared!r} holds {meta['tokens'][split]} {split} tokens; need "
                                 f"more than train.seq_len + 1 = {t.seq_len + 1}"
                                 f"{' (train.eval_every > 0)' if split == 'val' else ''}")
        return
    if d.path is None:
        key, size = "data.max_bytes", d.max_bytes
    else:
        key, size = "data.path", check_text_file(d.path).stat().st_size
    n_train = int(size * (1.0 - d.val_fraction))  # as data.split cuts; Batches needs more than seq_len + 1 tokens
    if n_train <= t.seq_len + 1:
        given = d.path if d.path is not None else d.max_bytes
        raise ValueError(f"{key}={given!r} gives {size} bytes ({n_train} for training after data.val_fraction="
                         f"{d.val_fraction}); need more than train.seq_len + 1 = {t.seq_len + 1} training bytes")
    if t.eval_every and size - n_train <= t.seq_len + 1:
        raise ValueError(f"train.eval_every={t.eval_every} needs more than train.seq_len + 1 = {t.seq_len + 1} "
                         f"held-out tokens; data.val_fraction={d.val_fraction} of {size} bytes leaves "
                         f"{size - n_train}: raise data.val_fraction")


def _check_checkpoint(c) -> None:
    every = non_negative_int("checkpoint.every", c.every, "(0 = never save)")
    non_negative_int("checkpoint.keep_last", c.keep_last, "(0 keeps every checkpoint)")
    boolean("checkpoint.async_save", c.async_save)
    positive_int("checkpoint.thread_count", c.thread_count, "(DCP writer threads per rank)")
    boolean("checkpoint.allow_unverified", c.allow_unverified)
    choice("checkpoint.on_disk_full", c.on_disk_full, ("stop", "continue"))
    boolean("checkpoint.save_on_signal", c.save_on_signal)
    if c.dir is not None and not str(c.dir):
        raise ValueError("checkpoint.dir must be a folder path or null, got ''")
    if c.dir is None and every > 0:
        raise ValueError(f"checkpoint.every={every} needs checkpoint.dir (where to write the checkpoints)")


def _check_spike(s, c) -> None:
    """``train.spike.*`` (``primitives.loss_spike``); enabled, it needs checkpoints to roll back to."""
    enabled = boolean("train.spike.enabled", s.enabled)
    with prefixed("train.spike."):
        LossSpikeWatchdog.from_config(s)
    non_negative_int("train.spike.max_rollbacks", s.max_rollbacks, "(0 = stop at the first spike)")
    if enabled and (c.dir is None or not c.every):
        raise ValueError(f"train.spike.enabled=true rolls back to a checkpoint: it needs checkpoint.dir and "
                         f"checkpoint.every > 0, got checkpoint.dir={c.dir}, checkpoint.every={c.every}")


def _check_bench(b) -> None:
    if not str(b.out_dir):
        raise ValueError("bench.out_dir must be a folder path, got ''")
    taken = next((p for p in (Path(str(b.out_dir)).expanduser(), *Path(str(b.out_dir)).expanduser().parents)
                  if p.exists() and not p.is_dir()), None)
    if taken is not None:
        raise ValueError(f"bench.out_dir={str(b.out_dir)!r}: {str(taken)!r} is a file, not a folder; give a folder "
                         "path (each bench run writes OUT_DIR/<timestamp>/)")
    non_negative_int("bench.burn_in", b.burn_in)
    positive_int("bench.repeats", b.repeats)
    positive_int("bench.steps_per_repeat", b.steps_per_repeat)
    positive_int("bench.pipeline_batch_size", b.pipeline_batch_size)
    if b.world_sizes is not None:
        if not b.world_sizes or not all(isinstance(n, int) and n >= 2 for n in b.world_sizes):
            raise ValueError(f"bench.world_sizes must be a non-empty list of integers >= 2 (rank counts) or null "
                             f"(= from the machine), got {list(b.world_sizes)}")
    if b.checkpoint_params is not None:
        integer("bench.checkpoint_params", b.checkpoint_params, 10_000, None, "(or null = 100M, 5M with --quick)")


# bench -> (the batch key it splits, the bench function's parameter that splits it, how)
BENCH_SPLITS = {
    "ga": ("train.batch_size", "k", "into K={} micro-batches"),
    "sharding": ("train.batch_size", "world_sizes", "over {} ranks"),
    "pipeline": ("bench.pipeline_batch_size", "m", "into m={} micro-batches"),
}


def validate_bench(cfg, names: list[str], params: dict[str, dict]) -> None:
    """What the benches in ``names`` need beyond ``validate``: the batch each one splits must split evenly.

    ``params``: bench name -> its function's keyword defaults (``{"ga": {"k": 4}}``), which the CLI reads from the
    bench's signature, so the numbers live in one place.
    """
    for name in names:
        if name not in BENCH_SPLITS or BENCH_SPLITS[name][1] not in params.get(name, {}):
            continue
        key, param, how = BENCH_SPLITS[name]
        value = OmegaConf.select(cfg, key)
        counts = params[name][param]
        counts = list(counts) if isinstance(counts, (list, tuple)) else [counts]
        if value % lcm(*counts):
            raise ValueError(f"{key} must be a multiple of {lcm(*counts)} for `bench {name}`, which splits it "
                             f"{how.format(' and '.join(map(str, counts)))}, got {value}")


def to_yaml(cfg: DictConfig, docs: bool = False) -> str:
    """The config as YAML; ``docs=True`` ends each key's line with its schema docstring as a ``#`` comment."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    if not docs:
        return text
    lines, path = [], []
    for line in text.splitlines():
        match = re.match(r"( *)([A-Za-z_]\w*):", line)
        if match:
            path = path[: len(match.group(1)) // 2] + [match.group(2)]
            group = OmegaConf.select(cfg, ".".join(path[:-1])) if len(path) > 1 else cfg
            schema = OmegaConf.get_type(group) if len(path) > 1 else Config
            doc = field_docs(schema).get(path[-1]) if is_dataclass(schema) else None
            node = OmegaConf.select(cfg, ".".join(path))
            if doc is None and isinstance(node, DictConfig) and is_dataclass(OmegaConf.get_type(node)):
                doc = OmegaConf.get_type(node).__doc__.strip().splitlines()[0]  # a group: its class docstring
            line = f"{line:<36s} # {doc.replace('``', '')}" if doc else line
        lines.append(line)
    return "\n".join(lines) + "\n"
