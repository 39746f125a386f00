"""Gradient flow: per-layer activation and gradient statistics over training steps, from hooks.

``GradFlow(model, layers=None)`` hooks each layer (default: the transformer blocks, ``primitives.find_blocks``; or
the top-level children that hold parameters when there are none; or the modules / names you pass):

* forward hook on the layer's output ``x`` (the first tensor of a tuple / ``ModelOutput``), per forward:
  ``act_norm`` = mean over tokens of ``||x_token||_2`` (last dim), ``act_mean`` = mean of ``x``, ``act_max`` =
  ``max |x|``, ``act_zero`` = fraction of entries exactly 0 (dead ReLUs);
* a tensor hook on that output: ``out_grad_norm`` = mean over tokens of ``||dL/dx_token||_2``, the gradient
  arriving at the layer (vanishing / exploding through depth);
* at ``step()``, from ``p.grad`` of the layer's parameters (parameters outside every layer form the group
  ``other``): ``grad_norm`` = ``sqrt(sum g^2)``, ``grad_mean``, ``grad_max`` = ``max |g|``, ``grad_zero`` = fraction of
  entries exactly 0, ``missing`` = parameters whose ``grad`` is None.

A step with K forwards (gradient accumulation) averages the per-forward statistics (``act_max``: the maximum) and
records ``forwards = K``; the parameter gradients are the accumulated ones the optimizer sees. Called from
``run_training_steps(on_step=gf.on_step)`` the gradients are read after clipping and the optimizer step (the loop
zeroes them only at the next step).

Recompute: a checkpointed layer's forward runs again inside backward (``primitives.recompute``, Hugging Face's
gradient checkpointing, ``torch.utils.checkpoint`` reentrant or not), and forward hooks on modules inside it fire a
second time. Calls made while autograd's engine runs a backward (``torch._C._current_graph_task_id() != -1``) are
not recorded, so each forward counts once and the statistics equal those without recompute. The reentrant
variant runs the first forward under ``no_grad``: it is recorded because the module is in training mode, and the
output-gradient hook goes on the output recomputed in backward (the first one has no graph). Forwards in eval mode
under ``no_grad`` (evaluation) are not recorded.

``table()`` is a markdown table of one step, ``plot(path)`` a PNG of the statistics over steps, ``remove()`` takes
the hooks off (also on leaving ``with GradFlow(...) as gf:``). Under FSDP2 / tensor parallelism the statistics
are this rank's shards.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from ..primitives.blocks import NoBlocksError, find_blocks
from ..primitives._checks import integer
from .common import check_model, fmt, markdown_table

ACT_KEYS = ("act_norm", "act_mean", "act_max", "act_zero")
GRAD_KEYS = ("grad_norm", "grad_mean", "grad_max", "grad_zero", "missing")
OTHER = "other"


def in_backward() -> bool:
    """True while autograd's engine runs a backward pass (where a checkpoint recomputes its forward)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):  # ModelOutput is an OrderedDict
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return None


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _token_norm(x: torch.Tensor) -> float:
    x = _local(x).detach().float()
    return float(x.norm(dim=-1).mean()) if x.dim() else float(x.abs())


class GradFlow:
    """Hooks on ``model``'s layers recording activation and gradient statistics per step (module docstring).

    ``layers``: None (the blocks), or a list of modules of ``model`` or of their names (``"blocks.0.mlp"``), or a
    dict ``{label: module}``. ``history``: one record per ``step()``: ``{"step": i, "layers": {label: stats}}``.
    """

    def __init__(self, model: nn.Module, layers=None):
        check_model(model)
        self.model = model
        self.layers = self._resolve(model, layers)
        self.groups = self._groups(model, self.layers)
        self.history: list[dict] = []
        self._handles = []
        self._pending_out_hooks = {name: 0 for name in self.layers}
        self._reset()
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))

    # -- set-up -------------------------------------------------------------------------------------------------

    @staticmethod
    def _resolve(model: nn.Module, layers) -> dict[str, nn.Module]:
        names = {id(m): n for n, m in model.named_modules()}
        if layers is None:
            try:
                found = find_blocks(model)
            except NoBlocksError:
                found = []
            if not found:
                found = [m for _, m in model.named_children() if any(True for _ in m.parameters())]
            if not found:
                raise ValueError(f"layers: {type(model).__name__} has no blocks and no child module with "
                                 "parameters; pass layers=[module, ...]")
            return {names[id(m)]: m for m in found}
        if isinstance(layers, dict):
            items = list(layers.items())
        elif isinstance(layers, (list, tuple)) and layers:
            items = []
            for layer in layers:
                if isinstance(layer, str):
                    module = dict(model.named_modules()).get(layer)
                    if module is None:
                        raise ValueError(f"layers: {type(model).__name__} has no submodule {layer!r}")
                    items.append((layer, module))
                else:
                    items.append((names.get(id(layer), ""), layer))
        else:
            raise ValueError(f"layers must be None (the blocks), a non-empty list of modules or module names, or a "
                             f"dict label -> module, got {layers!r}")
        out = {}
        for label, module in items:
            if not isinstance(module, nn.Module) or id(module) not in names:
                raise ValueError(f"layers: {label or type(module).__name__!r} is not a submodule of "
                                 f"{type(model).__name__}")
            out[str(label) or "(model)"] = module
        if OTHER in out:
            raise ValueError(f"layers: the label {OTHER!r} is reserved for the parameters outside every layer; "
                             "use another label")
        return out

    @staticmethod
    def _groups(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, list[nn.Parameter]]:
        """Every parameter of each layer (a block and a module inside it both count it); those in no layer form
        ``other``."""
        groups = {name: list(module.parameters()) for name, module in layers.items()}
        seen = {id(p) for params in groups.values() for p in params}
        rest = [p for p in model.parameters() if id(p) not in seen]
        if rest:
            groups[OTHER] = rest
        return groups

    def _reset(self) -> None:
        self._act = {name: {"n": 0, "norm": 0.0, "mean": 0.0, "max": 0.0, "zero": 0.0} for name in self.layers}
        self._out = {name: {"n": 0, "norm": 0.0} for name in self.layers}

    # -- hooks --------------------------------------------------------------------------------------------------

    def _forward_hook(self, name: str):
        def hook(module, args, output):
            x = _first_tensor(output)
            if x is None or not x.is_floating_point():
                return
            if in_backward():  # a checkpoint recomputing this forward: already recorded
                if self._pending_out_hooks[name] and x.requires_grad:  # reentrant: the graph starts here
                    self._pending_out_hooks[name] -= 1
                    x.register_hook(self._grad_hook(name))
                return
            if not (torch.is_grad_enabled() or module.training):  # evaluation
                return
            with torch.no_grad():
                v = _local(x).detach().float()
                a = self._act[name]
                a["n"] += 1
                a["norm"] += _token_norm(v)
                a["mean"] += float(v.mean())
                a["max"] = max(a["max"], float(v.abs().max()))
                a["zero"] += float((v == 0).float().mean())
            if x.requires_grad:
                x.register_hook(self._grad_hook(name))
            else:
                self._pending_out_hooks[name] += 1
        return hook

    def _grad_hook(self, name: str):
        def hook(grad):
            o = self._out[name]
            o["n"] += 1
            o["norm"] += _token_norm(grad)
        return hook

    # -- recording ----------------------------------------------------------------------------------------------

    @staticmethod
    def _grad_stats(params: list[nn.Parameter]) -> dict:
        sq = total = 0.0
        numel = zeros = missing = 0
        biggest = 0.0
        for p in params:
            if p.grad is None:
                missing += 1
                continue
            g = _local(p.grad).detach().float()
            sq += float(g.square().sum())
            total += float(g.sum())
            numel += g.numel()
            zeros += int((g == 0).sum())
            if g.numel():
                biggest = max(biggest, float(g.abs().max()))
        if not numel:  # no parameters, or none has a gradient
            return {**dict.fromkeys(GRAD_KEYS[:-1]), "missing": missing}
        return {"grad_norm": math.sqrt(sq), "grad_mean": total / numel, "grad_max": biggest, "grad_zero": zeros / numel,
                "missing": missing}

    def step(self) -> dict:
        """Close the current step: average this step's forwards, read the gradients; returns the record."""
        layers = {}
        for name in self.groups:
            row = {}
            if name in self._act:
                a, o = self._act[name], self._out[name]
                n = a["n"]
                row["forwards"] = n
                row.update({"act_norm": a["norm"] / n, "act_mean": a["mean"] / n, "act_max": a["max"],
                            "act_zero": a["zero"] / n} if n else dict.fromkeys(ACT_KEYS))
                row["out_grad_norm"] = o["norm"] / o["n"] if o["n"] else None
            else:
                row.update({"forwards": None, **dict.fromkeys(ACT_KEYS), "out_grad_norm": None})
            row.update(self._grad_stats(self.groups[name]))
            layers[name] = row
        record = {"step": len(self.history), "layers": layers}
        self.history.append(record)
        self._reset()
        self._pending_out_hooks = dict.fromkeys(self.layers, 0)
        return record

    def on_step(self, step: int, metrics: dict) -> None:
        """``run_training_steps(on_step=gf.on_step)``: record after each optimizer step (gradients after clipping)."""
        self.step()
        self.history[-1]["step"] = step

    # -- output -------------------------------------------------------------------------------------------------

    def table(self, step: int = -1) -> str:
        """Markdown table of one recorded step (default: the last)."""
        if not self.history:
            raise ValueError("GradFlow.table: no step recorded yet; call step() after backward")
        integer("step", step, -len(self.history), len(self.history) - 1)
        record = self.history[step]
        rows = []
        for name, r in record["layers"].items():
            rows.append([name, "-" if r["forwards"] is None else r["forwards"], fmt(r["act_norm"]),
                         fmt(r["act_mean"], 3), fmt(r["act_max"]), fmt(r["act_zero"], 3), fmt(r["out_grad_norm"]),
                         fmt(r["grad_norm"]), fmt(r["grad_mean"], 3), fmt(r["grad_max"]), fmt(r["grad_zero"], 3),
                         r["missing"]])
        return markdown_table(["layer", "fwd", "act norm", "act mean", "act max|x|", "act zeros", "dL/dout norm",
                               "grad norm", "grad mean", "grad max|g|", "grad zeros", "no grad"], rows) + \
            f"\n\nstep {record['step']}"

    def series(self, key: str) -> dict[str, list]:
        """``{layer: [value at each recorded step]}`` for one statistic (``"grad_norm"``, ``"act_norm"``, ...)."""
        keys = ("forwards", *ACT_KEYS, "out_grad_norm", *GRAD_KEYS)
        if key not in keys:
            raise ValueError(f"key must be one of {', '.join(keys)}, got {key!r}")
        return {name: [rec["layers"][name][key] for rec in self.history] for name in self.groups}

    def plot(self, path) -> Path:
        """PNG over steps: activation norm, gradient arriving at each layer, parameter-gradient norm (log y)."""
        if not self.history:
            raise ValueError("GradFlow.plot: no step recorded yet; call step() after backward")
        from ..bench.plots import plt, save

        steps = [rec["step"] for rec in self.history]
        panels = [("act_norm", "activation norm (mean token L2)", True),
                  ("out_grad_norm", "dL/d(layer output) norm", True), ("grad_norm", "parameter gradient norm", True)]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        cmap = plt.get_cmap("viridis")
        names = list(self.groups)
        for ax, (key, title, log) in zip(axes, panels):
            for i, (name, values) in enumerate(self.series(key).items()):
                points = [(s, v) for s, v in zip(steps, values) if v is not None and (v > 0 or not log)]
                if points:
                    ax.plot(*zip(*points), color="grey" if name == OTHER else cmap(i / max(1, len(names) - 1)),
                            linestyle="--" if name == OTHER else "-", linewidth=1.2, label=name)
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_title(title, fontsize=9, loc="left")
        axes[2].legend(fontsize=6, frameon=False, ncol=1 + len(names) // 12)
        fig.suptitle(f"gradient flow: {type(self.model).__name__}, {len(self.layers)} layers", fontsize=10)
        return save(fig, path)

    def remove(self) -> None:
        """Take every hook off the model (recorded history is kept)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "GradFlow":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
