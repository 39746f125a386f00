"""What ``python -m curry_train add NAME`` can copy: the primitives, their skill pages, and the files each one needs.

A primitive is one module (or package) under ``primitives/``. The files copied with it are *computed* from its
imports (``module_closure``: relative and ``curry_train.*`` imports, followed to the bottom, lazy imports inside
functions included), never kept by hand. Its tests are ``tests/primitives/test_<name>_standalone.py`` plus the
helpers they import from that folder; they import only torch, pytest and the primitive, so they run in any repo.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PACKAGE = PACKAGE_DIR.name  # "curry_train"
STANDALONE_TESTS = "primitives"  # the tests folder's sub-folder holding the standalone primitive tests


@dataclass(frozen=True)
class Primitive:
    name: str
    module: str  # path inside the package
    skill: str  # the skill page that teaches it
    summary: str
    usage: str  # the lines to add to a training loop; the skill page shows them verbatim

    @property
    def test_file(self) -> str:
        return f"test_{self.name}_standalone.py"


PRIMITIVES: dict[str, Primitive] = {p.name: p for p in [
    Primitive(
        "grad_accum", "primitives/grad_accum.py", "primitive-gradient-accumulation",
        "K micro-batches per optimizer step, normalised by the global valid-token count, sync on the last only",
        """\
from curry_train.primitives.grad_accum import GradientAccumulation

ga = GradientAccumulation(steps=len(micro_batches))
ga.plan([(y != -100).sum() for _, y in micro_batches])  # valid tokens, all-reduced over DP when distributed
for i, (x, y) in enumerate(micro_batches):
    with ga.sync_context(model, i):                      # DDP no_sync / FSDP2 reduce-scatter on the last only
        loss_sum, n_valid = your_summed_token_loss(model(x), y)
        ga.backward_loss(loss_sum, n_valid, i).backward()
optimizer.step()
optimizer.zero_grad()
"""),
    Primitive(
        "recompute", "primitives/recompute.py", "primitive-recompute",
        "activation checkpointing (full or selective) on every N-th transformer block, state-dict keys unchanged",
        """\
from curry_train.primitives.recompute import activation_memory, apply_recompute

apply_recompute(model, "selective", every_n=1)  # after building the model, before DDP/FSDP2 and the optimizer
print(activation_memory(model, (x, y))["activation_bytes"])  # measure what it saves on one of your batches
"""),
    Primitive(
        "distributed_optimizer", "primitives/distributed_optimizer.py", "primitive-distributed-optimizer",
        "DDP, ZeRO-1, FSDP2 (shard_grad_op, full) with bf16 and CPU offload, and the bytes each rank holds",
        """\
from curry_train.primitives.distributed_optimizer import DistributedOptimizer

# under torchrun, after torch.distributed.init_process_group()
do = DistributedOptimizer.wrap(model, sharding="full", lr=3e-4, weight_decay=0.1)  # no_shard|zero1|shard_grad_op|full
model, optimizer = do.model, do.optimizer
print(do.memory_report())  # bytes of parameters, gradients and optimizer state on this rank
"""),
    Primitive(
        "parallel_state", "primitives/parallel_state.py", "primitive-parallel-state",
        "the dp x pp x cp x tp rank grid as a named DeviceMesh, one process group per dim",
        """\
from curry_train.primitives.parallel_state import ParallelState

# under torchrun, after torch.distributed.init_process_group()
ps = ParallelState(dp=-1, pp=2)  # dp=-1 takes what is left of the world size
print(ps)                        # the grid and this rank's coordinates
dp_group, pp_group = ps.dp_group, ps.pp_group
"""),
    Primitive(
        "checkpoint", "primitives/checkpoint.py", "primitive-dcp",
        "atomic, resharding, optionally async DCP checkpoints with exact resume",
        """\
from curry_train.primitives.checkpoint import Checkpointer

ckpt = Checkpointer("checkpoints", keep_last=2)
meta = ckpt.load(model, optimizer, scheduler)  # None on a fresh start
start = meta["step"] if meta else 0
for step in range(start, total_steps):
    ...                                        # your training step
    if (step + 1) % 100 == 0:
        ckpt.save(step + 1, model, optimizer, scheduler)
ckpt.close()
"""),
    Primitive(
        "pipeline_schedule", "primitives/pipeline/__init__.py", "primitive-pipeline-schedule",
        "any torch.distributed.pipelining schedule over your stages, tied weights handled, and its simulator",
        """\
from curry_train.primitives.pipeline.schedule import PipelineSchedule

# every rank builds the same list of stage modules (stage 0 takes token ids, the last returns logits)
pipe = PipelineSchedule("1f1b", n_microbatches=4, stages=stages, pp_group=pp_group, loss_fn=your_loss)
optimizer = torch.optim.AdamW(pipe.parameters(), lr=3e-4)
loss = pipe.train_step(x, y)  # forward + backward over the micro-batches; the loss on the last stage's rank
optimizer.step()
optimizer.zero_grad()
"""),
    Primitive(
        "context_parallel", "primitives/context_parallel.py", "primitive-context-parallel",
        "ring attention over a cp group: sequences sharded with causal load balancing, exact backward, SDPA swapped in place",
        """\
from curry_train.primitives.context_parallel import apply_context_parallel, positions, shard_sequence

# under torchrun, after torch.distributed.init_process_group(); cp_group: e.g. ParallelState(cp=2).cp_group
apply_context_parallel(model, cp_group)  # every block's SDPA becomes ring attention; before recompute and FSDP2
cp_rank, cp = cp_group.rank(), cp_group.size()
x, y = shard_sequence(x, cp_rank, cp), shard_sequence(y, cp_rank, cp)  # this rank's N/cp tokens (N % (2*cp) == 0)
pos = positions(cp_rank, cp, x.size(1) * cp)  # their global positions: give these to RoPE / position embeddings
loss_sum, n_valid = your_summed_token_loss(model(x), y)  # divide by n_valid all-reduced over the cp and dp ranks
"""),
    Primitive(
        "moe", "primitives/moe.py", "primitive-moe",
        "top-k router (softmax/sigmoid, capacity, aux/z-loss, DeepSeek bias balancing), batched experts, expert parallelism",
        """\
from curry_train.primitives.moe import MoEMLP, moe_aux_loss, update_moe_biases

block.mlp = MoEMLP(d_model, d_ff, n_experts=8, top_k=2)  # in each block, in place of the dense MLP
loss = your_mean_token_loss(model(x), y) + moe_aux_loss(model)  # + every MoE layer's balancing (and z) loss
loss.backward()
optimizer.step()
update_moe_biases(model)  # DeepSeek-V3 balancing: only routers built with bias_balancing=True move
"""),
    Primitive(
        "tensor_parallel", "primitives/tensor_parallel.py", "primitive-tp-linear",
        "Megatron tensor parallelism over DTensor: column/row parallel linears, one plan for GPT, Llama and torchtitan "
        "blocks, sequence parallel, loss parallel",
        """\
from curry_train.primitives.tensor_parallel import apply_tensor_parallel

# under torchrun, after torch.distributed.init_process_group(); tp_mesh: e.g. ParallelState(tp=2).tp_mesh
apply_tensor_parallel(model, tp_mesh, sequence_parallel=True)  # before recompute, compile and FSDP2
loss_sum, n_valid = your_summed_token_loss(model(x), y)  # the same x, y on every rank of the tp group
"""),
    Primitive(
        "loss_spike", "primitives/loss_spike.py", "stage5-loss-spike-rollback",
        "a loss-spike watchdog (robust median baseline, sustained-spike rule) to roll back to the last good checkpoint",
        """\
from curry_train.primitives.loss_spike import LossSpikeWatchdog

watchdog = LossSpikeWatchdog(threshold_ratio=5.0, sustain_steps=3, min_history=20)
for step in range(start, total_steps):
    loss = your_training_step(model, optimizer, step)  # the step's mean loss: the same number on every rank
    if watchdog.observe(step, loss):                   # a sustained spike, begun at step watchdog.spike_start
        your_load_checkpoint_before(watchdog.spike_start)  # model, optimizer, scheduler as they were then
        watchdog.reset()                               # go on with step + 1's data: the spike's window is skipped
    elif (step + 1) % 100 == 0 and not watchdog.in_spike:  # never save a state taken during a spike
        your_save_checkpoint(step + 1, extra={"loss_spike": watchdog.state_dict()})
"""),
]}
ALIASES = {p.skill: p.name for p in PRIMITIVES.values()}


def resolve_names(names: list[str]) -> list[str]:
    """Primitive names (or skill-page aliases, or ``all``) -> canonical names; unknown names are one error line."""
    if not names:
        raise ValueError(f"name at least one primitive: {', '.join(PRIMITIVES)} or all")
    out: list[str] = []
    for name in names:
        if name == "all":
            out.extend(PRIMITIVES)
            continue
        canonical = name if name in PRIMITIVES else ALIASES.get(name)
        if canonical is None:
            raise ValueError(f"unknown primitive {name!r}; choose from {', '.join(PRIMITIVES)} or all "
                             f"(skill names such as {next(iter(ALIASES))} work too)")
        out.append(canonical)
    return list(dict.fromkeys(out))


def _imported_modules(path: Path) -> list[tuple[int, str | None, list[str]]]:
    """``(level, module, names)`` of every import in ``path``, anywhere in the file (lazy imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((0, a.name, []) for a in node.names)
    return found


def _module_file(root: Path, dotted: list[str]) -> Path | None:
    """The file of module ``a.b.c`` under ``root``: ``a/b/c.py`` or ``a/b/c/__init__.py``."""
    base = root.joinpath(*dotted)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _internal_imports(path: Path, package_dir: Path) -> set[Path]:
    """Files of ``package_dir`` that ``path`` imports (relative imports and absolute ``curry_train.*`` ones)."""
    rel = path.relative_to(package_dir)
    here = list(rel.parent.parts)  # the importing module's package, as path parts under package_dir
    found: set[Path] = set()
    for level, module, names in _imported_modules(path):
        if level:
            base = here[: len(here) - (level - 1)] if level > 1 else here
            if level - 1 > len(here):
                raise ValueError(f"{rel}: relative import beyond the {package_dir.name} package")
        elif module and module.split(".")[0] == package_dir.name:
            base, module = [], ".".join(module.split(".")[1:]) or None
        else:
            continue  # torch, the standard library, ...
        parts = base + (module.split(".") if module else [])
        target = _module_file(package_dir, parts)
        if target is None:
            raise ValueError(f"{rel} imports {'.' * level}{module or ''}, which is not in {package_dir}")
        found.add(target)
        for name in names:  # `from . import model_io`: a submodule, when one has that name
            sub = _module_file(package_dir, parts + [name])
            if sub is not None:
                found.add(sub)
    return found


def module_closure(start: list[str], package_dir: Path = PACKAGE_DIR, stubs: tuple[str, ...] = ()) -> list[str]:
    """Every package file ``start`` needs at import time: the files themselves, the files they import, and each
    ``__init__.py`` on the way down (Python runs those first), followed to the bottom. Paths inside the package.
    ``stubs`` are files the caller writes itself (listed, their imports not followed)."""
    todo = [package_dir / s for s in start]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if str(path.relative_to(package_dir)) in stubs:
            continue
        parent = path.parent
        while parent != package_dir.parent:  # the enclosing packages' __init__.py
            init = parent / "__init__.py"
            if init != path and init.is_file():
                todo.append(init)
            parent = parent.parent
        todo.extend(_internal_imports(path, package_dir))
    return sorted(str(p.relative_to(package_dir)) for p in seen)


def standalone_test_files(test_file: str, tests_dir: Path) -> list[str]:
    """The standalone test file and the helper modules of its folder it imports (``import x`` / ``from x import``)."""
    folder = tests_dir / STANDALONE_TESTS
    todo, seen = [folder / test_file], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: every primitive ships a standalone test")
        seen.add(path)
        for level, module, _ in _imported_modules(path):
            if not level and module and (folder / f"{module.split('.')[0]}.py").is_file():
                todo.append(folder / f"{module.split('.')[0]}.py")
    return sorted(p.name for p in seen)


PRIMITIVES_INIT = "primitives/__init__.py"  # the full one imports every primitive: ``add`` writes a stub instead


def primitive_files(names: list[str], package_dir: Path = PACKAGE_DIR) -> list[str]:
    """The package files these primitives need, ``primitives/__init__.py`` included (as a stub: see ``PRIMITIVES_INIT``)."""
    return module_closure([PRIMITIVES[n].module for n in names], package_dir, stubs=(PRIMITIVES_INIT,))
