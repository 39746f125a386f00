"""What goes into a model and what comes out, for models nobody here wrote.

Batches (``batch``) come in three shapes:

* a tensor ``x``: the inputs only (no targets);
* a pair ``(x, y)``: token ids and targets already aligned with the logits, ``y[b, t]`` the token that follows
  position ``t`` (our data, nanoGPT, torchtitan);
* a dict of keyword inputs (``input_ids``, ``attention_mask``, ``position_ids``...): Hugging Face style. Targets
  are ``labels``, which the model would shift itself (``labels[b, t + 1]`` follows position ``t``), or
  ``targets``, already aligned. Neither is passed to the model: the loss is computed here, as a sum.

Outputs: a logits tensor, a ``ModelOutput`` / dict with ``logits``, or a tuple whose first element is the logits.

``forward_loss_sum(model, batch)`` returns ``(sum of per-token cross-entropy over valid targets, valid count)``, and
``count_target_tokens(batch)`` counts the valid targets exactly as that loss sees them: with ``labels`` the first
position has no target, so a row of ``n`` non-padding labels gives ``n - 1``. Counting ``labels != -100`` without
the shift over-counts by one per row and gives gradient accumulation the wrong divisor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
TARGET_KEYS = ("labels", "targets")


def logits_of(output) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``.logits``, ``["logits"]`` or the first tuple element."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"cannot find logits in a {type(output).__name__}: return a tensor, an object or dict with "
                        "'logits', or a tuple whose first element is the logits")
    return logits


def model_inputs(batch) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to call the model with: targets are never passed (the loss is computed outside)."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, dict):
        return (), {k: v for k, v in batch.items() if k not in TARGET_KEYS}
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return (batch[0],), {}
    raise TypeError(f"a batch is a tensor, an (inputs, targets) pair or a dict of keyword inputs; got "
                    f"{type(batch).__name__}")


def aligned_targets(batch, logits: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(targets, logits)`` cut so that ``targets[b, t]`` is what ``logits[b, t]`` predicts (``labels`` shifted by
    one); ``(None, logits)`` when the batch holds no targets."""
    if isinstance(batch, dict):
        if "labels" in batch:
            labels = batch["labels"]
            return labels[..., 1:], (logits[..., :-1, :] if logits is not None else None)
        return batch.get("targets"), logits
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[1], logits
    return None, logits


def count_target_tokens(batch, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Valid targets of ``batch`` the way ``forward_loss_sum`` counts them (a 0-dim integer tensor)."""
    targets, _ = aligned_targets(batch)
    if targets is None:
        raise ValueError("the batch holds no targets: pass (inputs, targets) or a dict with 'labels' or 'targets'")
    return (targets != ignore_index).sum()


def forward(model, batch):
    """``model(*args, **kwargs)`` for this batch shape."""
    args, kwargs = model_inputs(batch)
    return model(*args, **kwargs)


def forward_loss_sum(model, batch, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of cross-entropy over valid targets, number of valid targets)`` of one forward of ``model``."""
    targets, logits = aligned_targets(batch, logits_of(forward(model, batch)))
    if targets is None:
        raise ValueError("the batch holds no targets: pass (inputs, targets) or a dict with 'labels' or 'targets'")
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")
    return loss, (targets != ignore_index).sum()
