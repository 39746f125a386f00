"""In-process ``main(["train", ...])`` runs of a one-block GPT, checkpointing as told: the reference and the
interrupted or damaged runs of the checkpoint tests (test_nothing_lost.py, test_trust.py)."""

import json
import os
from pathlib import Path

from curry_train.__main__ import main

TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "train.seq_len=32", "train.batch_size=4",
        "train.progress=false", "train.log_every=0", "train.warmup_steps=2"]


def train_tiny(tmp_path: Path, name: str, *overrides: str, steps: int, every: int, ckpt: Path | None = None,
               env: dict | None = None) -> tuple[int, list]:
    """``main(["train", ...])`` for ``steps`` steps saving every ``every`` into ``ckpt`` (default
    ``tmp_path/ckpt``), with ``env`` set for the run only; returns the exit code and the metrics lines."""
    metrics = tmp_path / f"{name}.jsonl"
    args = ["train", *TINY, f"train.steps={steps}", f"train.metrics_file={metrics}", f"checkpoint.every={every}",
            f"checkpoint.dir={ckpt or tmp_path / 'ckpt'}", *overrides]
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        code = main(args)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return code, lines


def train_keeping_model(overrides: list[str]):
    """``train`` on ``overrides`` in this process (a launched rank); returns ``(history, model, optimizer)``: the
    model and optimizer ``train`` built and stepped (DDP's ``.module`` unwrapped), caught on their way into
    ``run_training_steps``."""
    import curry_train.train as train_module
    from curry_train.config import load_config

    kept = {}
    run = train_module.run_training_steps

    def spy(model, optimizer, *args, **kwargs):
        kept["model"], kept["optimizer"] = model, optimizer
        return run(model, optimizer, *args, **kwargs)

    train_module.run_training_steps = spy
    try:
        history = train_module.train(load_config(overrides))
    finally:
        train_module.run_training_steps = run
    return history, getattr(kept["model"], "module", kept["model"]), kept["optimizer"]
