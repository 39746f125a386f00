"""Preflight asserts: six checks on one batch that catch the bugs a loss curve hides, before any long run.

``preflight(model, batch)`` runs them on ``model`` itself and restores it afterwards (weights, buffers, gradients,
train/eval flags and the caller's RNG state: ``common.restored``). Each check passes, fails (with what it saw) or is
skipped (with why):

============  =====================================================================================================
init_loss     fresh model: ``|L0 - ln V| <= init_tolerance * ln V`` (default 0.1), ``L0`` the mean token loss in
              eval mode, ``V`` = ``vocab_size`` or the logits' last dimension. A freshly initialised LM predicts
              nearly uniformly; far above ``ln V`` means over-confident logits (init scale, a missing 1/sqrt(d)),
              far below means the targets leak into the inputs. ``init_tolerance=None`` skips it (a trained model).
finite        the logits and the loss hold no NaN/Inf.
dtype_device  every floating parameter has one dtype, every parameter and buffer one device, and the logits are
              on that device.
gradients     after one backward of the mean loss (train mode) every parameter with ``requires_grad`` has a
              gradient that is not None, is finite and is not all zeros; the failing names are listed (a detached
              layer, an unused module, a ``* 0``).
causality     for each probe position ``t``: tokens ``t+1 ..`` replaced, the logits at positions ``0 .. t`` unchanged
              (max abs difference ``<= max(1e-4, 10 eps(dtype)) * max(1, max |logits|)``), in eval mode.
              ``causal=False`` skips it (a bidirectional model).
overfit       AdamW (no weight decay, gradient norm clipped to 1) on this one batch, train mode: the loss falls
              to ``<= overfit_fraction * L_first`` (default 0.2) within ``overfit_steps`` (default 100; 0 skips)
              at one of the learning rates ``lr`` (default 1e-3, then 1e-2, each from the same weights).
============  =====================================================================================================

Models returning logits, a Hugging Face ``ModelOutput`` or a tuple, and batches ``(x, y)`` or HF dicts with
``labels`` work through ``primitives.model_io``. With your own ``loss_fn(model, batch) -> (loss_sum, n_valid)``
the loss checks use it; the checks on logits are skipped when ``model(inputs)`` does not give logits.

``preflight_main(argv)`` is ``python -m curry_train preflight [hydra overrides]``: the configured model as ``train``
builds it in one process (``common.configured_model``: recompute and compile as configured) on the first ``--rows``
rows of training batch 0 (``data.build_batches``); prints the table and returns 0 when every check passes, else 1.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..primitives._checks import non_negative_int, positive_float, positive_int
from ..primitives.model_io import forward, logits_of
from ..user_model import input_vocab
from .common import (check_loss_fn, check_model, configured_model, fmt, input_ids, markdown_table, mean_loss,
                     model_device, open_fraction, restored, to_device, with_input_ids)

PASS, FAIL, SKIP = "pass", "FAIL", "skip"
OVERFIT_CLIP = 1.0  # gradient-norm clip of the overfit run, as train.grad_clip defaults
MAX_NAMES = 6  # parameter names listed in a failing check before "... and N more"


@dataclass
class Check:
    """One preflight check: ``status`` is ``pass``, ``FAIL`` or ``skip``; ``measured`` what it saw; ``rule`` the
    condition it tested."""

    name: str
    status: str
    measured: str
    rule: str


@dataclass
class PreflightReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when no check failed (skipped checks do not fail)."""
        return all(c.status != FAIL for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def __getitem__(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; checks: {[c.name for c in self.checks]}")

    def markdown(self) -> str:
        table = markdown_table(["check", "result", "measured", "rule"],
                               [(c.name, c.status, c.measured, c.rule) for c in self.checks])
        verdict = "all checks pass" if self.passed else f"{len(self.failures)} failed: " + \
            ", ".join(c.name for c in self.failures)
        return f"{table}\n\npreflight: {verdict}"

    __str__ = markdown


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES])
    return shown + (f" ... and {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else "")


def _check_args(model, batch, loss_fn, vocab_size, overfit_steps, lr, init_tolerance, overfit_fraction,
                probe_positions):
    check_model(model)
    check_loss_fn(loss_fn)
    if vocab_size is not None:
        positive_int("vocab_size", vocab_size, "(or None: the logits' last dimension)")
    non_negative_int("overfit_steps", overfit_steps, "(0 skips the overfit check)")
    lrs = tuple(lr) if isinstance(lr, (list, tuple)) else (lr,)
    if not lrs:
        raise ValueError("lr must be a positive number or a non-empty list of them, got []")
    for value in lrs:
        positive_float("lr", value, "(or a list of them, tried in order)")
    if init_tolerance is not None:
        positive_float("init_tolerance", init_tolerance, "(a fraction of ln V, or None to skip)")
    open_fraction("overfit_fraction", overfit_fraction)
    pair = isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)
    ok_batch = pair or (isinstance(batch, dict) and any(k in batch for k in ("labels", "targets")))
    if not ok_batch:
        raise ValueError(f"batch must be an (inputs, targets) pair of tensors or a dict with 'labels' or 'targets', "
                         f"got {type(batch).__name__}")
    if probe_positions is not None:
        if not isinstance(probe_positions, (list, tuple)) or not probe_positions:
            raise ValueError(f"probe_positions must be a non-empty list of token positions or None, "
                             f"got {probe_positions!r}")
        for t in probe_positions:
            non_negative_int("probe_positions[i]", t)
    return lrs


def _tolerance(logits: torch.Tensor) -> float:
    eps = torch.finfo(logits.dtype).eps if logits.is_floating_point() else 1e-7
    scale = max(1.0, float(logits.detach().abs().max()))
    return max(1e-4, 10 * eps) * scale


def preflight(model: nn.Module, batch, loss_fn=None, vocab_size: int | None = None, overfit_steps: int = 100,
              lr=(1e-3, 1e-2), *, init_tolerance: float | None = 0.1, overfit_fraction: float = 0.2,
              causal: bool = True, probe_positions=None) -> PreflightReport:
    """Run the six checks (module docstring) on ``model`` with ``batch``; the model is restored afterwards.

    ``batch``: ``(x, y)`` with ``y`` aligned to the logits, or a dict of keyword inputs with ``labels`` (shifted by
    the loss, Hugging Face style) or ``targets``. ``probe_positions``: the ``t`` of the causality probe (default
    ``T/4, T/2, 3T/4, T-2``). ``lr``: one learning rate or several, tried in order from the same starting weights
    until one overfits (the best LR to memorise a batch depends on the model's size).
    """
    lrs = _check_args(model, batch, loss_fn, vocab_size, overfit_steps, lr, init_tolerance, overfit_fraction,
                      probe_positions)
    device = model_device(model)
    batch = to_device(batch, device)
    report = PreflightReport()
    add = report.checks.append
    with restored(model) as snap:
        model.eval()
        with torch.no_grad():
            try:
                logits = logits_of(forward(model, batch)).detach()
            except Exception as e:
                if loss_fn is None:
                    raise
                logits, why = None, f"model(inputs) gives no logits with your loss_fn ({type(e).__name__})"
            loss0 = float(mean_loss(model, batch, loss_fn))
        if logits is None:
            for name in ("finite", "dtype_device"):
                add(Check(name, SKIP, why, "needs the logits"))
        else:
            add(_finite(logits, loss0))
            add(_dtype_device(model, logits))
        add(_init_loss(loss0, vocab_size or (logits.size(-1) if logits is not None else None), init_tolerance))
        add(_gradients(model, batch, loss_fn))
        if not causal:
            add(Check("causality", SKIP, "causal=False", "a bidirectional model sees the future by design"))
        elif logits is None:
            add(Check("causality", SKIP, why, "needs the logits"))
        else:
            add(_causality(model, batch, logits, vocab_size, probe_positions))
        add(_overfit(model, batch, loss_fn, overfit_steps, lrs, overfit_fraction, snap))
    return report


def _finite(logits: torch.Tensor, loss0: float) -> Check:
    bad = int((~torch.isfinite(logits.float())).sum())
    ok = bad == 0 and math.isfinite(loss0)
    measured = f"{bad:,} of {logits.numel():,} logits non-finite, loss {fmt(loss0)}"
    return Check("finite", PASS if ok else FAIL, measured, "no NaN/Inf in logits or loss")


def _dtype_device(model: nn.Module, logits: torch.Tensor) -> Check:
    by_dtype: dict = {}
    by_device: dict = {}
    for n, p in model.named_parameters():
        if p.is_floating_point():
            by_dtype.setdefault(str(p.dtype).replace("torch.", ""), []).append(n)
        by_device.setdefault(str(p.device), []).append(n)
    for n, b in model.named_buffers():
        by_device.setdefault(str(b.device), []).append(n)
    problems = []
    if len(by_dtype) > 1:
        major = max(by_dtype, key=lambda k: len(by_dtype[k]))
        problems += [f"{k}: {_names(v)}" for k, v in by_dtype.items() if k != major]
    if len(by_device) > 1:
        major = max(by_device, key=lambda k: len(by_device[k]))
        problems += [f"on {k}: {_names(v)}" for k, v in by_device.items() if k != major]
    device = max(by_device, key=lambda k: len(by_device[k])) if by_device else str(logits.device)
    if str(logits.device) != device:
        problems.append(f"logits on {logits.device}, parameters on {device}")
    if not logits.is_floating_point():
        problems.append(f"logits are {logits.dtype}")
    measured = "; ".join(problems) if problems else \
        f"params {'/'.join(by_dtype) or '-'} on {device}, logits {str(logits.dtype).replace('torch.', '')}"
    return Check("dtype_device", FAIL if problems else PASS, measured,
                 "one parameter dtype, one device for parameters, buffers and logits")


def _init_loss(loss0: float, vocab: int | None, tolerance: float | None) -> Check:
    if tolerance is None:
        return Check("init_loss", SKIP, f"loss {fmt(loss0)}", "init_tolerance=None (not a fresh model)")
    if vocab is None:
        return Check("init_loss", SKIP, f"loss {fmt(loss0)}", "needs vocab_size (no logits to read it from)")
    expected = math.log(vocab)
    ok = math.isfinite(loss0) and abs(loss0 - expected) <= tolerance * expected
    return Check("init_loss", PASS if ok else FAIL, f"loss {fmt(loss0)}, ln({vocab}) = {fmt(expected)}",
                 f"|L0 - ln V| <= {tolerance:g} ln V = {fmt(tolerance * expected, 3)}")


def _gradients(model: nn.Module, batch, loss_fn) -> Check:
    model.train()
    model.zero_grad(set_to_none=True)
    mean_loss(model, batch, loss_fn).backward()
    missing, nonfinite, zero = [], [], []
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for n, p in trainable:
        if p.grad is None:
            missing.append(n)
        elif not bool(torch.isfinite(p.grad).all()):
            nonfinite.append(n)
        elif not bool(p.grad.ne(0).any()):
            zero.append(n)
    model.zero_grad(set_to_none=True)
    problems = [f"no gradient: {_names(missing)}"] * bool(missing) + \
        [f"non-finite: {_names(nonfinite)}"] * bool(nonfinite) + [f"all zero: {_names(zero)}"] * bool(zero)
    bad = len(missing) + len(nonfinite) + len(zero)
    measured = "; ".join(problems) if problems else f"{len(trainable)} of {len(trainable)} parameters"
    return Check("gradients", FAIL if bad else PASS, measured,
                 "every trainable parameter: gradient not None, finite, not all zero")


def _causality(model: nn.Module, batch, logits: torch.Tensor, vocab_size, probe_positions) -> Check:
    ids = input_ids(batch)
    rule = "logits at positions <= t unchanged when tokens t+1.. change"
    if ids is None or ids.dim() != 2 or ids.is_floating_point():
        return Check("causality", SKIP, "no (B, T) token-id input to perturb", rule)
    T = ids.size(1)
    if T < 2:
        return Check("causality", SKIP, f"sequence length {T}", rule)
    vocab = vocab_size or input_vocab(model)[0] or logits.size(-1)
    positions = probe_positions or sorted({max(0, min(T - 2, t)) for t in (T // 4, T // 2, 3 * T // 4, T - 2)})
    for t in positions:
        if t > T - 2:
            raise ValueError(f"probe_positions must be in [0, T - 2] = [0, {T - 2}] (T = sequence length), got {t}")
    tol = _tolerance(logits)
    g = torch.Generator(device="cpu").manual_seed(0)
    worst = 0.0
    model.eval()
    with torch.no_grad():
        for t in positions:
            changed = ids.clone()
            shift = torch.randint(1, vocab, changed[:, t + 1:].shape, generator=g).to(ids.device)
            changed[:, t + 1:] = (changed[:, t + 1:] + shift) % vocab
            other = logits_of(forward(model, with_input_ids(batch, changed))).detach()
            diff = (other[:, : t + 1].float() - logits[:, : t + 1].float()).abs()
            per_position = diff.amax(dim=tuple(i for i in range(diff.dim()) if i != 1))
            if not bool(torch.isfinite(per_position).all()):
                return Check("causality", SKIP, "non-finite logits", rule)
            worst = max(worst, float(per_position.max()))
            leaks = (per_position > tol).nonzero().flatten().tolist()
            if leaks:
                return Check("causality", FAIL,
                             f"position {leaks[0]} changes when tokens {t + 1}.. change "
                             f"(max |dlogit| {fmt(float(per_position.max()), 3)}); "
                             f"{len(leaks)} of {t + 1} positions <= {t} leak", rule + f" (tol {fmt(tol, 2)})")
    return Check("causality", PASS, f"t in {positions}: max |dlogit| {fmt(worst, 3)}", rule + f" (tol {fmt(tol, 2)})")


def _overfit_one(model: nn.Module, batch, loss_fn, steps: int, lr: float, keep: float) -> tuple[bool, str]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    first = None
    for step in range(steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = mean_loss(model, batch, loss_fn)
        value = float(loss.detach())
        if not math.isfinite(value):
            return False, f"lr {lr:g}: loss {value} at step {step}"
        first = value if first is None else first
        if value <= keep * first:
            return True, f"lr {lr:g}: {fmt(first)} -> {fmt(value)} in {step} steps"
        if step == steps:
            return False, (f"lr {lr:g}: {fmt(first)} -> {fmt(value)} in {steps} steps "
                           f"({fmt(value / first, 3)} of the first)")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, OVERFIT_CLIP)
        optimizer.step()
    raise AssertionError("unreachable")


def _overfit(model: nn.Module, batch, loss_fn, steps: int, lrs: tuple[float, ...], keep: float, snap) -> Check:
    rule = (f"loss <= {keep:g} x first within {steps} AdamW steps (clip {OVERFIT_CLIP:g}) at lr "
            f"{' or '.join(f'{lr:g}' for lr in lrs)}")
    if steps == 0:
        return Check("overfit", SKIP, "overfit_steps=0", rule)
    tried = []
    for lr in lrs:
        snap.restore()  # every LR starts from the model as given
        ok, measured = _overfit_one(model, batch, loss_fn, steps, lr, keep)
        tried.append(measured)
        if ok:
            return Check("overfit", PASS, "; ".join(tried), rule)
    return Check("overfit", FAIL, "; ".join(tried), rule)


def preflight_main(argv: list[str] | None = None) -> int:
    """``python -m curry_train preflight [--rows N] [--steps N] [--lr LR,LR] [overrides]``: 0 if every check passes."""
    from ..config import load_config, validate
    from ..data import build_batches
    from ..user_model import build_loss, model_name

    parser = argparse.ArgumentParser(
        prog="python -m curry_train preflight",
        description="Preflight asserts on the configured model and one training batch: loss at init ~ ln(vocab), "
                    "every parameter gets a gradient, no NaN/Inf, one dtype and device, no peeking at future "
                    "tokens, and the model can overfit the batch. Exit 0 when all pass, 1 otherwise.")
    parser.add_argument("--rows", type=int, default=4, help="rows of training batch 0 to use (default 4)")
    parser.add_argument("--steps", type=int, default=100, help="overfit steps (default 100; 0 skips the check)")
    parser.add_argument("--lr", default="1e-3,1e-2",
                        help="overfit AdamW learning rate(s), comma-separated, tried in order (default 1e-3,1e-2)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train (model=..., train.seq_len=...)")
    args = parser.parse_args(argv)
    positive_int("--rows", args.rows)
    try:
        lrs = [float(v) for v in args.lr.split(",")]
    except ValueError:
        raise ValueError(f"--lr must be comma-separated numbers, e.g. 1e-3,1e-2; got {args.lr!r}") from None
    cfg = load_config(args.overrides)
    validate(cfg)
    model, _, _ = configured_model(cfg)
    x, y = build_batches(cfg).global_batch(0)
    rows = min(args.rows, x.size(0))
    loss_fn = build_loss(cfg) if cfg.train.loss is not None else None
    report = preflight(model, (x[:rows], y[:rows]), loss_fn, overfit_steps=args.steps, lr=lrs)
    print(f"preflight: {model_name(cfg)}, batch {rows} x {x.size(1)} (training batch 0)\n")
    print(report.markdown())
    return 0 if report.passed else 1
