"""Small-scale ablation: arms x seeds of short runs in this process, mean +- std per arm, and a yes / no /
inconclusive verdict for each arm against the first one (the baseline), from Welch's t-test.

``ablate({"baseline": [], "idea": ["model.n_embd=64"]}, seeds=3, steps=50)`` runs every arm with every seed
(``seed=S`` added to its overrides, ``train.steps=steps``) through ``train_run``: the configured model
(``user_model.build_model``, recompute / compile from ``parallelize``), AdamW with the warmup-cosine schedule
(``loop.build_optimizer``, ``loop.build_scheduler``) and ``loop.run_training_steps``: what ``train`` runs in one
process, without checkpoints. Overrides are Hydra's (``config.load_config``), applied as
``base_overrides + arm overrides + [seed=S, train.steps=N]``.

Metric (lower is better): ``final_loss`` = mean training loss of the last ``max(1, steps // 10)`` steps;
``val_loss`` = mean token loss over ``val_batches`` fixed batches of the held-out split (``data.split``), the same
rows for every arm and seed; ``min_loss`` = the lowest training loss of the run.

Statistics, per arm against the baseline (``n`` seeds each, means ``m``, sample variances ``s^2``):
``d = m_base - m_arm`` (> 0: the arm is better), ``se = sqrt(s_base^2/n_base + s_arm^2/n_arm)``, ``t = d / se``, Welch-
Satterthwaite ``df = se^4 / ((s_base^2/n_base)^2/(n_base-1) + (s_arm^2/n_arm)^2/(n_arm-1))``, two-sided
``p = I_{df/(df+t^2)}(df/2, 1/2)`` (``student_t_sf``: the Student-t tail from the regularized incomplete beta
function, continued fraction; no scipy), and the ``1 - alpha`` interval ``d +- t_crit(df) * se``.

``test="paired"`` uses the seed-by-seed differences instead (``d_i = base_i - arm_i`` for the seeds finished in
both arms; ``se = sd(d) / sqrt(n)``, ``df = n - 1``): every arm runs the same seeds, so a seed's runs share the data
order (and the init when the arm keeps the shapes), and pairing removes that shared noise.

Verdict, with ``min_effect`` the smallest improvement worth scaling up for (default: 1% of the baseline's mean):

* ``yes``: ``p < alpha`` and ``d >= min_effect`` (a significant improvement of a size that matters);
* ``no``: the interval's upper end ``< min_effect`` (any improvement is confidently too small, or the arm is worse),
  or a seed of the arm was killed (``kill=True``);
* ``inconclusive``: otherwise: add seeds, or use a larger small model.

``kill=True`` runs the baseline's seeds first and then every other run under ``KillCriterion`` (baseline = the mean of
the baseline's seed curves, noise = their spread): a clearly worse run stops early and its arm is ``no``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch

from ..primitives._checks import choice, integer, positive_float, positive_int
from .common import configured_model, fmt, markdown_table, mean_loss, open_fraction
from .kill import KillCriterion, KillRun, curve_from_history

METRICS = ("final_loss", "val_loss", "min_loss")
TESTS = ("welch", "paired")
YES, NO, INCONCLUSIVE = "yes", "no", "inconclusive"
RESERVED = ("seed", "train.steps")  # set by ablate itself
KILL_SMOOTHING = 0.1  # EMA weight for the kill rule on per-step training losses (stage3-kill-criterion)


# -- Student t, from the regularized incomplete beta function ----------------------------------------------------

def _beta_continued_fraction(a: float, b: float, x: float, max_iter: int = 500, eps: float = 1e-15) -> float:
    """Continued fraction of ``I_x(a, b)`` (modified Lentz; Numerical Recipes ``betacf``)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b) = B(x; a, b) / B(a, b)`` for ``a, b > 0``, ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """Two-sided tail ``P(|T| >= |t|)`` of Student's t with ``df`` degrees of freedom:
    ``I_{df/(df+t^2)}(df/2, 1/2)``."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def student_t_cdf(t: float, df: float) -> float:
    """``P(T <= t)``."""
    tail = student_t_sf(t, df) / 2.0
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """``t`` with ``P(T <= t) = p`` (bisection on ``student_t_cdf``; ``0 < p < 1``)."""
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if student_t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


@dataclass
class TTestResult:
    diff: float  # mean(a) - mean(b)
    se: float
    t: float
    df: float
    p: float  # two-sided
    ci: tuple[float, float]  # 1 - alpha interval of diff


def welch_t_test(a, b, alpha: float = 0.05) -> TTestResult:
    """Welch's unequal-variance t-test of ``mean(a) - mean(b)`` (module docstring formulas); >= 2 values each."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"welch_t_test needs at least 2 values per group, got {len(a)} and {len(b)}")
    open_fraction("alpha", alpha)
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff, se = ma - mb, math.sqrt(va + vb)
    if se == 0.0:
        df = float(len(a) + len(b) - 2)
        t = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return TTestResult(diff, 0.0, t, df, 1.0 if diff == 0 else 0.0, (diff, diff))
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = diff / se
    half = student_t_quantile(1.0 - alpha / 2.0, df) * se
    return TTestResult(diff, se, t, df, student_t_sf(t, df), (diff - half, diff + half))


def paired_t_test(a, b, alpha: float = 0.05) -> TTestResult:
    """Paired t-test of ``mean(a_i - b_i)``: ``se = sd(d) / sqrt(n)``, ``df = n - 1`` (same fields as Welch's)."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_t_test needs two equally long lists of at least 2 values, got {len(a)} and {len(b)}")
    open_fraction("alpha", alpha)
    d = [x - y for x, y in zip(a, b)]
    diff, se, df = statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d)), float(len(d) - 1)
    if se == 0.0:
        t = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return TTestResult(diff, 0.0, t, df, 1.0 if diff == 0 else 0.0, (diff, diff))
    t = diff / se
    half = student_t_quantile(1.0 - alpha / 2.0, df) * se
    return TTestResult(diff, se, t, df, student_t_sf(t, df), (diff - half, diff + half))


# -- runs -------------------------------------------------------------------------------------------------------

def train_run(overrides=(), steps: int | None = None, on_step=None, val_batches: int = 0) -> dict:
    """One run of the configured model in this process: ``{"history": [...], "val_loss": float | None}``.

    ``config.load_config(overrides)`` (+ ``train.steps=steps``), validated; seeded model, ``parallelize`` (recompute /
    compile; one process: no sharding), AdamW + warmup-cosine, ``run_training_steps`` without progress output.
    ``val_batches > 0`` adds the mean token loss over that many fixed held-out batches after training.
    """
    from ..config import load_config, validate
    from ..data import Batches, build_batches, load_tokens, split
    from ..loop import build_optimizer, build_scheduler, run_training_steps
    from ..primitives import GradientAccumulation
    from ..user_model import build_loss

    overrides = list(overrides) + ([f"train.steps={steps}"] if steps is not None else [])
    cfg = load_config(overrides)
    validate(cfg)
    t = cfg.train
    model, dist_opt, device = configured_model(cfg)
    optimizer = dist_opt.shard_optimizer(build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2)))
    scheduler = build_scheduler(optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)
    loss_fn = build_loss(cfg) if t.loss is not None else None
    result = {"history": [], "val_loss": None, "killed": None}
    try:
        run_training_steps(model, optimizer, scheduler, build_batches(cfg), GradientAccumulation.from_config(t),
                           t.steps, device=device, grad_clip=t.grad_clip, log_every=0, progress=False,
                           loss_fn=loss_fn, nonfinite_patience=t.nonfinite_patience,
                           on_step=_recording(result["history"], on_step))
    except KillRun as e:
        result["killed"] = e.decision
        return result
    if val_batches:
        _, val_tokens = split(load_tokens(cfg.data.path, cfg.data.max_bytes), cfg.data.val_fraction)
        val = Batches(val_tokens, t.batch_size, t.seq_len, seed=0)
        model.eval()
        with torch.no_grad():
            losses = [float(mean_loss(model, tuple(v.to(device) for v in val.global_batch(i)), loss_fn))
                      for i in range(val_batches)]
        result["val_loss"] = statistics.fmean(losses)
    return result


def _recording(history: list, on_step):
    def hook(step, metrics):
        history.append(metrics)
        if on_step is not None:
            on_step(step, metrics)
    return hook


def metric_of(run: dict, metric: str) -> float:
    history = run["history"]
    if metric == "val_loss":
        return run["val_loss"]
    if metric == "min_loss":
        return min(m["loss"] for m in history)
    tail = history[-max(1, len(history) // 10):]
    return statistics.fmean(m["loss"] for m in tail)


# -- ablation ---------------------------------------------------------------------------------------------------

@dataclass
class ArmResult:
    name: str
    overrides: list[str]
    values: list[float]  # the metric of each finished seed
    seeds: list[int] = field(default_factory=list)  # the seed of each value
    killed: list[int] = field(default_factory=list)  # seeds stopped by the kill criterion
    verdict: str = "baseline"
    reason: str = ""
    test: TTestResult | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan


@dataclass
class AblationResult:
    arms: list[ArmResult]
    metric: str
    seeds: list[int]
    steps: int | None
    alpha: float
    min_effect: float
    test: str = "welch"

    @property
    def verdicts(self) -> dict[str, str]:
        """``{arm: "yes" | "no" | "inconclusive"}`` for every arm but the baseline."""
        return {a.name: a.verdict for a in self.arms[1:]}

    def markdown(self) -> str:
        ci = f"{100 * (1 - self.alpha):g}% CI"
        table = markdown_table(["arm", "overrides", "seeds", f"{self.metric} mean ± std",
                                f"improvement vs {self.arms[0].name} ({ci})", f"p ({self.test})", "verdict", "why"],
                               [_row(a) for a in self.arms])
        return (f"{table}\n\n{len(self.seeds)} seeds {self.seeds}, {self.steps or 'configured'} steps; lower "
                f"{self.metric} is better; yes = p < {self.alpha:g} and improvement >= min_effect "
                f"{fmt(self.min_effect, 3)}; no = the CI's upper end < min_effect")


def _row(a: ArmResult) -> list[str]:
    t = a.test
    return [a.name, " ".join(a.overrides) or "-",
            f"{len(a.values)}" + (f" ({len(a.killed)} killed)" if a.killed else ""),
            f"{fmt(a.mean)} ± {fmt(a.std, 2)}" if a.values else "-",
            "-" if t is None else f"{t.diff:+.4f} [{t.ci[0]:+.4f}, {t.ci[1]:+.4f}]",
            "-" if t is None else fmt(t.p, 3),
            a.verdict if a.verdict == "baseline" else f"**{a.verdict}**", a.reason or "-"]


def _check_arms(arms) -> dict[str, list[str]]:
    if not isinstance(arms, dict) or len(arms) < 2:
        raise ValueError(f"arms must be a dict of at least 2 arms name -> list of overrides (the first is the "
                         f"baseline), got {arms!r}")
    out = {}
    for name, overrides in arms.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"arms: names must be non-empty strings, got {name!r}")
        out[name] = _check_overrides(f"arms[{name!r}]", overrides)
    return out


def _validate_every_arm(arms: dict, base_overrides, steps: int | None, seed: int) -> None:
    """Compose and ``validate`` every arm's config before any run: a bad key in the last arm is one line naming the
    arm, not an error after the first arms have run."""
    from ..config import load_config, validate

    for name, overrides in arms.items():
        try:
            validate(load_config([*base_overrides, *overrides, f"seed={seed}",
                                  *([f"train.steps={steps}"] if steps is not None else [])]))
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"arm {name!r}: {e}") from None


def _check_overrides(name: str, overrides) -> list[str]:
    if not isinstance(overrides, (list, tuple)) or not all(isinstance(o, str) for o in overrides):
        raise ValueError(f"{name} must be a list of Hydra overrides (strings), got {overrides!r}")
    for o in overrides:
        if o.split("=", 1)[0].lstrip("+~") in RESERVED:
            raise ValueError(f"{name}: {o!r} is set by ablate (use the seeds= and steps= arguments)")
    return list(overrides)


def ablate(arms: dict, seeds=3, steps: int | None = 100, base_overrides=(), metric: str = "final_loss", *,
           alpha: float = 0.05, min_effect: float | None = None, test: str = "welch", kill: bool = False,
           val_batches: int = 4, progress: bool = False) -> AblationResult:
    """Run ``arms`` x ``seeds`` and compare each arm with the first (module docstring for the rules).

    ``seeds``: a count (seeds ``0 .. n-1``) or a list of distinct seeds, at least 2. ``steps``: optimizer steps per
    run (None: the configured ``train.steps``). ``progress``: print one line per run.
    """
    arms = _check_arms(arms)
    if isinstance(seeds, (list, tuple)):
        seed_list = [integer("seeds[i]", s, 0, 2**32 - 1) for s in seeds]
        if len(set(seed_list)) != len(seed_list) or len(seed_list) < 2:
            raise ValueError(f"seeds must be a count >= 2 or a list of at least 2 distinct seeds, got {seeds!r}")
    else:
        seed_list = list(range(integer("seeds", seeds, 2, note="(a spread needs two runs)")))
    if steps is not None:
        positive_int("steps", steps)
    _check_overrides("base_overrides", base_overrides)
    choice("metric", metric, METRICS)
    choice("test", test, TESTS)
    alpha = open_fraction("alpha", alpha)
    if min_effect is not None:
        positive_float("min_effect", min_effect, "(or None: 1% of the baseline mean)")
    positive_int("val_batches", val_batches)
    _validate_every_arm(arms, base_overrides, steps, seed_list[0])

    results: list[ArmResult] = []
    base_curves: list = []  # the baseline's seed curves: the kill rule for every later run (kill=True)
    for name, overrides in arms.items():
        arm = ArmResult(name, overrides, [])
        curves = []
        for seed in seed_list:
            rule = KillCriterion(None, base_curves, smoothing=KILL_SMOOTHING) if base_curves else None
            run = train_run([*base_overrides, *overrides, f"seed={seed}"], steps, rule and rule.on_step,
                            val_batches if metric == "val_loss" else 0)
            if run["killed"] is not None:
                arm.killed.append(seed)
                if progress:
                    print(f"ablate: {name} seed {seed}: killed at step {run['killed'].step}", flush=True)
                continue
            arm.values.append(metric_of(run, metric))
            arm.seeds.append(seed)
            curves.append(curve_from_history(run["history"]))
            if progress:
                print(f"ablate: {name} seed {seed}: {metric} {arm.values[-1]:.4f}", flush=True)
        if kill and not results:
            base_curves = curves
        results.append(arm)

    base = results[0]
    effect = min_effect if min_effect is not None else 0.01 * abs(base.mean)
    for arm in results[1:]:
        if arm.killed:
            arm.verdict, arm.reason = NO, f"seeds {arm.killed} killed by the kill criterion"
            continue
        if len(arm.values) < 2:
            arm.verdict, arm.reason = INCONCLUSIVE, "fewer than 2 finished seeds"
            continue
        if test == "paired":  # seed by seed: the runs of a seed share init (when shapes match) and data order
            common = [s for s in base.seeds if s in arm.seeds]
            if len(common) < 2:
                arm.verdict, arm.reason = INCONCLUSIVE, "fewer than 2 seeds finished in both arms"
                continue
            a = [base.values[base.seeds.index(s)] for s in common]
            arm.test = paired_t_test(a, [arm.values[arm.seeds.index(s)] for s in common], alpha)
        else:
            arm.test = welch_t_test(base.values, arm.values, alpha)  # diff = base - arm: > 0 means the arm is better
        d, (_, high), p = arm.test.diff, arm.test.ci, arm.test.p
        if p < alpha and d >= effect:
            arm.verdict, arm.reason = YES, f"better by {d:.4f} (p = {p:.3g})"
        elif high < effect:
            arm.verdict, arm.reason = NO, f"improvement at most {high:+.4f} < min_effect {effect:.4f}"
        else:
            arm.verdict, arm.reason = INCONCLUSIVE, (f"CI [{arm.test.ci[0]:+.4f}, {high:+.4f}] reaches min_effect "
                                                     f"{effect:.4f} (p = {p:.3g})")
    return AblationResult(results, metric, seed_list, steps, alpha, effect, test)
