"""The report of one ``bench`` run: a new folder, ``report.md``, ``report.json`` and the PNGs, each written atomically.

``new_run_dir(out_dir)`` makes ``out_dir/<YYYYmmdd-HHMMSS>/`` (``-2``, ``-3``... when that exists: a run never
writes into an earlier one). ``write_report`` writes, after every bench, through a temporary file and
``os.replace`` (a reader never sees half a file):

* ``report.json``: ``{"meta": ..., "results": {bench: every number its function returned}}``;
* ``report.md``: the run (command, time, git commit), the machine (CPU model and cores, GPUs, torch, the device and
  rank backend used), then per bench what it measures, its numbers as markdown tables (built from its result: each
  list of rows is a table, every other number a key/value line), what it printed, and its plots; the config as
  YAML last.

Plots (``PLOTS``, drawn by ``plots``): ``recompute.png``, ``sharding.png``, ``mfu.png``; the pipeline bench draws its
own timelines into the run folder.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from . import plots
from .machine import describe

PLOTS = {"recompute": plots.plot_recompute, "sharding": plots.plot_sharding, "mfu": plots.plot_mfu}


def new_run_dir(out_dir) -> Path:
    """A new, empty ``out_dir/<timestamp>[-k]`` folder (created here; ``mkdir`` without ``exist_ok`` is the lock)."""
    root = Path(out_dir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"bench.out_dir={str(out_dir)!r} cannot be created: {e}") from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in range(1, 10_000):
        path = root / (stamp if k == 1 else f"{stamp}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{root}: no free run folder name for {stamp}")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def command_line(argv: list[str] | None = None) -> str:
    """``python -m curry_train ARGS`` as the user would retype it."""
    args = sys.argv[1:] if argv is None else argv
    return "python -m curry_train " + shlex.join(args)


def metadata(cfg, names: list[str], quick: bool, command: str | None) -> dict:
    from . import QUICK

    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": command or command_line(),
        "benches": list(names), "quick": quick, "quick_settings": QUICK if quick else None,
        "cwd": os.getcwd(), "machine": describe(cfg), "config": OmegaConf.to_container(cfg, resolve=True),
    }


def plot(name: str, result: dict, run_dir: Path) -> list[str]:
    """The PNGs of one bench's result, written into ``run_dir`` (file names relative to it); none for a bench that
    skipped (a model it cannot run on)."""
    if not isinstance(result, dict) or "skipped" in result:
        return []
    if name in PLOTS:
        return [PLOTS[name](result, run_dir / f"{name}.png").name]
    if name == "pipeline":
        return [Path(r["png"]).name for r in result.get("rows", []) if r.get("png")]
    if result.get("png"):  # a bench that drew its own figure into the run folder (moe)
        return [Path(result["png"]).name]
    return []


def write_report(run_dir: Path, results: dict, printed: dict, meta: dict, figures: dict) -> None:
    """(Re)write ``report.json`` and ``report.md`` for the benches run so far."""
    meta = {**meta, "updated": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    payload = {"meta": meta, "results": results, "figures": figures}
    atomic_write_text(run_dir / "report.json", json.dumps(payload, indent=2, default=_json_default) + "\n")
    atomic_write_text(run_dir / "report.md", markdown(results, printed, meta, figures))


def _json_default(value):
    if hasattr(value, "item"):  # a 0-dim tensor or numpy scalar
        return value.item()
    if isinstance(value, (set, tuple, Path)):
        return list(value) if not isinstance(value, Path) else str(value)
    return str(value)


# -- markdown ---------------------------------------------------------------------------------------------------

def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if 1e3 <= abs(value) < 1e6 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def is_scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def flatten(result: dict, prefix: str = "") -> tuple[dict, list[tuple[str, list[dict]]]]:
    """``(scalars by dotted key, [(title, rows)])``: every list of dicts is a table, every scalar (in nested dicts
    too) a key; lists of plain numbers (per-round seconds) stay in report.json only."""
    scalars, tables = {}, []
    for key, value in result.items():
        path = f"{prefix}{key}"
        if is_scalar(value):
            scalars[path] = value
        elif isinstance(value, dict):
            inner_scalars, inner_tables = flatten(value, f"{path}.")
            scalars.update(inner_scalars)
            tables += inner_tables
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
            tables.append((path, list(value)))
    return scalars, tables


def table(rows: list[dict]) -> str:
    """Markdown table of ``rows``; columns = their scalar keys, in first-seen order (``png`` paths are drawn below the
    tables instead)."""
    columns = list(dict.fromkeys(k for r in rows for k, v in r.items() if is_scalar(v) and k != "png"))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def machine_lines(meta: dict) -> list[str]:
    m = meta["machine"]
    git = m.get("git")
    commit = (git["commit"] + (" (uncommitted changes)" if git["dirty"] else "")) if git else "not a git repository"
    sizes = ", ".join(map(str, m["world_sizes"]))
    return [
        "| | |", "|---|---|",
        f"| CPU | {m['cpu']}, {m['cpu_cores']} cores, torch threads {m['torch_threads']} |",
        f"| GPU | {', '.join(m['gpus']) if m['gpus'] else 'none'} |",
        f"| software | torch {m['torch']} (CUDA {m['cuda'] or 'none'}), Python {m['python']}, {m['platform']} |",
        f"| device | single-process benches: {m['device']}; sharding ranks: {m['sharding_ranks']}, N = {sizes}; "
        f"pipeline ranks: {m['pipeline_ranks']} |",
        f"| git | {commit} in `{meta['cwd']}` |",
    ]


def markdown(results: dict, printed: dict, meta: dict, figures: dict) -> str:
    from . import BENCH_HELP, quick_help

    out = ["# curry_train bench report", "",
           f"- command: `{meta['command']}`",
           f"- started {meta['started']}, last written {meta['updated']}",
           f"- benches: {', '.join(meta['benches'])} ({len(results)} done)",
           f"- quick: {'yes: ' + ' '.join(quick_help().split()) if meta['quick'] else 'no (full settings)'}",
           "", "## Machine", "", *machine_lines(meta), ""]
    for name, result in results.items():
        took = meta.get("seconds", {}).get(name)
        out += [f"## {name}", "", BENCH_HELP.get(name, "") + (f" ({took:.1f} s)" if took is not None else ""), ""]
        scalars, tables = flatten(result) if isinstance(result, dict) else ({"result": result}, [])
        if scalars:
            out += ["| key | value |", "|---|---|", *(f"| {k} | {cell(v)} |" for k, v in scalars.items()), ""]
        for title, rows in tables:
            out += [f"`{title}`:", "", table(rows), ""]
        for png in figures.get(name, []):
            out += [f"![{name}: {png}]({png})", ""]
        if printed.get(name, "").strip():
            out += ["Printed:", "", "```text", printed[name].strip("\n"), "```", ""]
    out += ["## Config", "", "```yaml", OmegaConf.to_yaml(OmegaConf.create(meta["config"])).rstrip(), "```", ""]
    return "\n".join(out)
