"""What the workflow tools share: the mean token loss of one batch, a snapshot of a model that restores it exactly,
batches moved to the model's device, markdown tables.

``loss_fn(model, batch) -> (loss_sum, n_valid)`` is the package's loss contract (``user_model.build_loss``):
``None`` means ``primitives.model_io.forward_loss_sum`` (cross-entropy over targets != -100 of a model returning
logits, a ``ModelOutput`` or a tuple). The mean token loss is ``loss_sum / n_valid``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from numbers import Real

import torch
import torch.nn as nn

from ..primitives.model_io import forward_loss_sum


def check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def open_fraction(name: str, value, include_one: bool = False, note: str = "") -> float:
    """A number in ``(0, 1)`` (``(0, 1]`` with ``include_one``); one ``ValueError`` line naming ``name`` otherwise."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and (0 < value < 1 or (include_one and value == 1))
    if not ok:
        raise ValueError(f"{name} must be a number in (0, 1{']' if include_one else ')'}{' ' + note if note else ''}, "
                         f"got {value!r}")
    return float(value)


def check_loss_fn(loss_fn) -> Callable | None:
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"loss_fn must be None (cross-entropy on the logits) or a function (model, batch) -> "
                         f"(loss_sum, n_valid), got {type(loss_fn).__name__}")
    return loss_fn


def mean_loss(model, batch, loss_fn: Callable | None = None) -> torch.Tensor:
    """``loss_sum / n_valid`` of one forward (a scalar tensor, graph attached when grad is on)."""
    loss_sum, n_valid = (loss_fn or forward_loss_sum)(model, batch)
    n = torch.as_tensor(n_valid, device=loss_sum.device).clamp(min=1)
    return loss_sum / n


def model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def to_device(batch, device):
    """A tensor, an ``(x, y)`` pair or a dict of tensors, moved to ``device`` (other values kept)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


def input_ids(batch) -> torch.Tensor | None:
    """The token-id tensor a batch feeds the model: ``x`` of ``(x, y)``, the tensor itself, ``input_ids``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return batch.get("input_ids")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0]
    return None


def with_input_ids(batch, ids: torch.Tensor):
    """``batch`` with its token ids replaced by ``ids`` (targets unchanged)."""
    if isinstance(batch, torch.Tensor):
        return ids
    if isinstance(batch, dict):
        return {**batch, "input_ids": ids}
    return (ids, batch[1])


class Snapshot:
    """Parameters, buffers, gradients and train/eval flags of ``model``, copied; ``restore()`` puts them back in
    place (``copy_`` into the same tensors, so an optimizer or a caller holding them sees the old values again)."""

    def __init__(self, model: nn.Module):
        self.model = model
        with torch.no_grad():
            self.params = {n: p.detach().clone() for n, p in model.named_parameters()}
            self.grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}
            self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.training = {n: m.training for n, m in model.named_modules()}

    def restore(self) -> None:
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(self.params[n])
                p.grad = None if self.grads[n] is None else self.grads[n].clone()
            for n, b in self.model.named_buffers():
                if n in self.buffers:
                    b.copy_(self.buffers[n])
        for n, m in self.model.named_modules():
            if n in self.training:
                m.training = self.training[n]

    def equal(self) -> bool:
        """True when every parameter and buffer holds exactly the snapshot's values."""
        return (all(torch.equal(p.detach(), self.params[n]) for n, p in self.model.named_parameters())
                and all(torch.equal(b, self.buffers[n]) for n, b in self.model.named_buffers() if n in self.buffers))


@contextlib.contextmanager
def restored(model: nn.Module):
    """Run the block on ``model``, then put back its weights, buffers, gradients and train/eval flags, and the
    caller's RNG state (CPU, and the model's CUDA device): the tool leaves no trace."""
    snap = Snapshot(model)
    device = model_device(model)
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield snap
    finally:
        snap.restore()


def configured_model(cfg) -> tuple[nn.Module, object, torch.device]:
    """``(model, dist_opt, device)`` as ``train`` builds them in one process: seeded (``cfg.seed``), on ``cfg.device``,
    through ``parallelize`` (recompute and compile as configured; no sharding without torchrun). Build the optimizer
    with ``dist_opt.shard_optimizer(...)``."""
    from ..data import seed_everything
    from ..distributed import resolve_device
    from ..parallelize import parallelize
    from ..user_model import build_model

    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model, dist_opt = parallelize(build_model(cfg).to(device), cfg)
    return model, dist_opt, device


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; cells are ``str()``-ed and ``|`` escaped."""
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float | None, digits: int = 4) -> str:
    """A float for a table: ``digits`` significant digits, ``-`` for None."""
    if x is None:
        return "-"
    return f"{x:.{digits}g}"
