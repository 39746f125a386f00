"""Logs people look at: TensorBoard scalars during training, loss curves from a metrics file afterwards.

``TensorBoardLog(log_dir, flops_per_token)`` (``train.tensorboard_dir``, rank 0): ``log(step, metrics)`` writes
``loss/train``, ``loss/val`` (the steps that evaluated), ``lr``, ``grad_norm``, ``tokens_per_s`` and, for a model
that counts its FLOPs (the reference GPT's ``flops_per_token``), ``model_flops_per_s`` = FLOPs per token x
tokens/s. MFU needs the hardware's peak, which a run does not know: ``bench mfu`` measures it. Skipped
(non-finite) steps are not written. ``close()`` flushes the event file.

``plot_metrics(path, out)`` (``python -m curry_train plot METRICS.jsonl --out loss.png``): the train loss per step
and the validation loss at the steps that have one, from ``train.metrics_file``; a step logged twice (a restarted
attempt) counts with its last line. Returns the number of train and validation points.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

SCALARS = {"loss": "loss/train", "val_loss": "loss/val", "lr": "lr", "grad_norm": "grad_norm",
           "tokens_per_s": "tokens_per_s"}


class TensorBoardLog:
    def __init__(self, log_dir, flops_per_token: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(str(log_dir)).expanduser()))
        self.flops_per_token = flops_per_token

    def log(self, step: int, metrics: dict) -> None:
        values = {tag: metrics[key] for key, tag in SCALARS.items() if key in metrics}
        if self.flops_per_token and "tokens_per_s" in metrics:
            values["model_flops_per_s"] = self.flops_per_token * metrics["tokens_per_s"]
        for tag, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, value, step + 1)  # x = optimizer steps done

    def close(self) -> None:
        self.writer.close()


def with_tensorboard(on_step, log: TensorBoardLog | None):
    """``on_step`` with ``log.log`` first (None: ``on_step`` itself)."""
    if log is None:
        return on_step

    def hook(step: int, metrics: dict) -> None:
        log.log(step, metrics)
        if on_step is not None:
            on_step(step, metrics)

    return hook


def read_metrics(path) -> dict[int, dict]:
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file (train.metrics_file writes one)")
    rows = {}
    for n, line in enumerate(p.read_text().splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}: line {n} is not JSON (a metrics file has one JSON object per line)") \
                    from None
            if not isinstance(row, dict) or "step" not in row or "loss" not in row:
                raise ValueError(f"{path}: line {n} has no step and loss: not a train.metrics_file")
            rows[int(row["step"])] = row
    if not rows:
        raise ValueError(f"{path}: no metrics in it")
    return dict(sorted(rows.items()))


def plot_metrics(path, out) -> tuple[int, int]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    train = [(s + 1, r["loss"]) for s, r in rows.items() if isinstance(r["loss"], (int, float))]
    val = [(s + 1, r["val_loss"]) for s, r in rows.items() if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("mean token loss (nats)")
    ax.set_title(Path(str(path)).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(str(out)).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return len(train), len(val)
