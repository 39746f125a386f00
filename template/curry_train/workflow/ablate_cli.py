"""``python -m curry_train ablate``: the command line of ``ablate.ablate`` (arms as ``--arm NAME=KEY=VALUE,...``,
seeds, steps, metric, test; Markdown or ``--json`` on stdout)."""

from __future__ import annotations

import math
import re

from .ablate import METRICS, TESTS, AblationResult, ablate

def parse_arm(text: str) -> tuple[str, list[str]]:
    """``"NAME=KEY=VALUE,KEY=VALUE"`` -> ``(NAME, [overrides])`` (``"NAME="``: no overrides); commas inside
    brackets or quotes stay in their override (``parallel.layers_per_stage=[1,1]``). Bad syntax: one ``ValueError``."""
    name, eq, rest = text.partition("=")
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(rest):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(rest[start:i])
            start = i + 1
    parts = [p.strip() for p in parts + [rest[start:]] if p.strip()]
    bad = next((p for p in parts if "=" not in p and not p.startswith("~")), None)
    if not eq or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or bad is not None:
        why = f": {bad!r} is not an override KEY=VALUE" if eq and bad is not None else ""
        raise ValueError(f"--arm {text!r} must be NAME=KEY=VALUE,KEY=VALUE (NAME: letters, digits, - or _; NAME= for "
                         f"no overrides), e.g. --arm wide=model.n_embd=128,model.n_head=4{why}")
    return name.strip(), parts


def _json_number(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def result_json(result: AblationResult) -> dict:
    """The ablation as plain JSON (NaN -> null): settings, then per arm its values, verdict and test."""
    def test(t):
        return None if t is None else {k: _json_number(getattr(t, k)) for k in ("diff", "se", "t", "df", "p")} | {
            "ci": [_json_number(c) for c in t.ci]}

    arms = [{"name": a.name, "overrides": a.overrides, "seeds": a.seeds, "values": a.values, "killed": a.killed,
             "mean": _json_number(a.mean), "std": _json_number(a.std), "verdict": a.verdict, "reason": a.reason,
             "test": test(a.test)} for a in result.arms]
    return {"metric": result.metric, "seeds": result.seeds, "steps": result.steps, "alpha": result.alpha,
            "min_effect": result.min_effect, "test": result.test, "arms": arms}


def ablate_main(argv: list[str] | None = None) -> int:
    """``python -m curry_train ablate --arm NAME=OVERRIDES --arm ... [--seeds N] [--steps N] [--metric M] [--test T]
    [--min-effect X] [--alpha A] [--kill] [--json] [overrides]``: ``ablate`` over the arms (the first is the
    baseline; ``overrides`` go to every arm), the Markdown table on stdout (``--json``: one JSON object); returns 0."""
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m curry_train ablate",
        description="Small-scale ablation: every arm x every seed as a short run in this process, mean +- std per arm "
                    "and a yes / no / inconclusive verdict against the first arm (Welch's or a paired t-test).",
        epilog="example: python -m curry_train ablate --arm base= --arm wide=model.n_embd=128 --seeds 3 --steps 50 "
               "train.lr=1e-3")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=KEY=VALUE,...",
                        help="an arm: its name and Hydra overrides, comma-separated (NAME= for none); repeat, at least "
                             "2, the first is the baseline")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per arm, >= 2 (default 3)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default 100)")
    parser.add_argument("--metric", default="final_loss", help=f"{' | '.join(METRICS)} (default final_loss)")
    parser.add_argument("--test", default="welch", help=f"{' | '.join(TESTS)} (default welch)")
    parser.add_argument("--min-effect", type=float, default=None,
                        help="smallest improvement worth having (default: 1%% of the baseline mean)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    parser.add_argument("--kill", action="store_true", help="stop clearly worse runs early (stage3-kill-criterion)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the Markdown table")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every arm, as for train")
    args = parser.parse_args(argv)
    arms = dict(parse_arm(a) for a in args.arm)
    if len(args.arm) < 2 or len(arms) < len(args.arm):
        raise ValueError(f"--arm: give at least 2 arms with distinct names (the first is the baseline), got "
                         f"{[a.partition('=')[0] for a in args.arm]}")
    result = ablate(arms, args.seeds, args.steps, args.overrides, args.metric, alpha=args.alpha,
                    min_effect=args.min_effect, test=args.test, kill=args.kill, progress=not args.json)
    print(json.dumps(result_json(result), indent=1) if args.json else result.markdown())
    return 0
