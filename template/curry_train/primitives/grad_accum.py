"""Gradient accumulation: K micro-batch forward/backward passes per optimizer step.

Per micro-batch ``i`` of ``K`` (``train_step_kwargs(i)``):

* ``zero_grad``        only on ``i == 0``: gradients accumulate in ``.grad`` across the K backward passes;
* ``sync_gradients``   only on ``i == K-1``: data-parallel gradient reduction runs once per optimizer step;
* ``step_optimizer``   only on ``i == K-1``;
* ``collect_metrics``  only on ``i == K-1``;
* ``loss_divisor``     what this micro-batch's loss is divided by before ``backward()``.

Normalisation. ``normalization="tokens"`` (default) makes the accumulated gradient the gradient of the
*mean token loss over the whole global batch*, however unevenly valid (non-padding) tokens fall into
micro-batches and data-parallel ranks. ``plan(valid_tokens_per_microbatch, group)`` all-reduces the global
valid-token count ``T`` once per step; each micro-batch then back-propagates ``sum_of_token_losses / loss_divisor``.
Data-parallel wrappers (DDP, FSDP) *average* gradients over the ``N`` ranks of ``group``, so
``loss_divisor = T / N``: after averaging, the gradient is ``sum over every token / T``. With one process
``loss_divisor == T``.

``normalization="microbatches"`` is the classic ``mean_loss / K``: each micro-batch's *mean* loss is divided by
``K``. It equals the token mean only when every micro-batch holds the same number of valid tokens; with padding
it over-weights short micro-batches (the bug HF transformers shipped until late 2024).

``sync_context(model, i)`` must wrap forward *and* backward: DDP decides in forward whether the backward
will all-reduce, so a ``no_sync`` entered only around ``backward()`` silently syncs every micro-batch.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from ._checks import choice, positive_int
from ._config import config_getter

NORMALIZATIONS = ("tokens", "microbatches")
STEPS_NOTE = "(1 = no accumulation)"


class GradientAccumulation:
    def __init__(self, steps: int = 1, normalization: str = "tokens"):
        self.steps = positive_int("steps", steps, STEPS_NOTE)
        self.normalization = choice("normalization", normalization, NORMALIZATIONS)
        self.global_tokens: int | None = None
        self._dp_size = 1

    @classmethod
    def from_config(cls, cfg, key: str = "gradient_accumulation_steps", normalization_key: str = "grad_accum_normalization"):
        """Build from any mapping or attribute object holding ``key`` (e.g. Hydra's ``cfg.train``)."""
        get = config_getter(cfg)
        steps = positive_int(key, get(key, 1), STEPS_NOTE)
        return cls(steps, choice(normalization_key, get(normalization_key, "tokens"), NORMALIZATIONS))

    @property
    def enabled(self) -> bool:
        return self.steps > 1

    def _check(self, i: int) -> None:
        if not 0 <= i < self.steps:
            raise IndexError(f"micro-batch index {i} out of range for {self.steps} accumulation steps")

    def is_first(self, i: int) -> bool:
        self._check(i)
        return i == 0

    def is_last(self, i: int) -> bool:
        self._check(i)
        return i == self.steps - 1

    def plan(self, valid_tokens_per_microbatch, group=None) -> int:
        """Fix this optimizer step's normaliser; returns the global valid-token count ``T``.

        ``valid_tokens_per_microbatch``: this rank's K counts (ints or tensors). The sum is all-reduced over
        ``group`` (the data-parallel group; ``None`` = the default group) when torch.distributed is
        initialised: one collective per optimizer step, not per micro-batch.

        Count each micro-batch with ``model_io.count_target_tokens(batch)``: the valid targets exactly as the loss
        sees them. For Hugging Face ``labels`` (shifted inside the model) a row of ``n`` non-padding labels has
        ``n - 1`` targets; ``(labels != -100).sum()`` over-counts by one per row and scales the gradient down.
        """
        counts = [int(c) for c in valid_tokens_per_microbatch]
        if len(counts) != self.steps:
            raise ValueError(f"plan() got {len(counts)} micro-batch token counts, expected {self.steps}")
        total = torch.tensor(sum(counts), dtype=torch.int64)
        self._dp_size = 1
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend(group) == "nccl":
                total = total.cuda()
            dist.all_reduce(total, group=group)
            self._dp_size = dist.get_world_size(group)
        self.global_tokens = int(total.item())
        if self.global_tokens == 0:
            raise ValueError("the global batch holds no valid tokens (every target is padding)")
        return self.global_tokens

    def loss_divisor(self) -> float:
        if self.normalization == "microbatches":
            return float(self.steps)
        if self.global_tokens is None:
            raise RuntimeError('normalization="tokens" needs plan(valid_tokens_per_microbatch) once per optimizer step')
        return self.global_tokens / self._dp_size

    def sum_divisor(self, i: int, n_valid) -> float:
        """What micro-batch ``i``'s *summed* token loss is divided by before backward, given its ``n_valid`` valid
        tokens: ``T / N`` (``tokens``, after ``plan``) or ``max(n_valid, 1) * K`` (``microbatches``: its mean / K)."""
        self._check(i)
        if self.normalization == "microbatches":
            return float(max(int(n_valid), 1) * self.steps)
        return self.loss_divisor()

    def backward_loss(self, loss_sum: torch.Tensor, n_valid, i: int) -> torch.Tensor:
        """The scalar to call ``backward()`` on for micro-batch ``i``: ``loss_sum / sum_divisor(i, n_valid)``."""
        return loss_sum / self.sum_divisor(i, n_valid)

    def train_step_kwargs(self, i: int) -> dict:
        last = self.is_last(i)
        return {
            "zero_grad": self.is_first(i),
            "sync_gradients": last,
            "step_optimizer": last,
            "loss_divisor": self.loss_divisor(),
            "collect_metrics": last,
        }

    def sync_context(self, model: torch.nn.Module, i: int):
        """Context for forward + backward of micro-batch ``i``: gradient sync only on the last one.

        DDP (and FSDP1): ``no_sync()`` on non-final micro-batches. FSDP2 (``fully_shard``): it has no ``no_sync``;
        ``set_requires_gradient_sync(is_last)`` skips the reduce-scatter (keeping unsharded gradients until the
        last micro-batch). Any other module: nothing to skip.
        """
        last = self.is_last(i)
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            return self._fsdp_sync(model, last)
        if hasattr(model, "no_sync"):  # DDP (and FSDP1)
            return nullcontext() if last else model.no_sync()
        return nullcontext()

    @staticmethod
    @contextmanager
    def _fsdp_sync(model, last: bool):
        model.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def __repr__(self) -> str:
        return f"GradientAccumulation(steps={self.steps}, normalization={self.normalization!r})"
