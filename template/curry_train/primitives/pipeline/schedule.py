"""Pipeline parallelism on ``torch.distributed.pipelining``: run any PyTorch schedule over a model's stages.

``PipelineSchedule(kind, n_microbatches, stages, pp_group, loss_fn)`` wraps ``PipelineStage`` and the schedule
class of ``kind`` (``KINDS``: gpipe, 1f1b, interleaved, looped_bfs, zb, zbv, dualpipev); it does not
re-implement the runtime. ``stages`` is the list of *all* ``S = p * v`` stage modules (every rank builds the
same list, e.g. with ``curry_train.stages.split_model``: the reference GPT, HF Llama/GPT-2, torchtitan); each rank keeps the stages it owns:

* loop style (gpipe, 1f1b, interleaved, looped_bfs, zb): rank r holds stages r, r + p, r + 2p, ...
* V style (zbv, dualpipev): rank r holds r and 2p - 1 - r (rank 0 holds the first *and* the last stage).

``train_step(batch, target)`` is one forward + backward over ``n_microbatches`` chunks of ``batch`` (split on
dim 0). The rank holding stage 0 feeds ``batch``, the rank holding the last stage feeds ``target``: pass both on
every rank, the others ignore them. Gradients *accumulate* into ``.grad`` (zero them yourself).

Loss normalisation. ``loss_fn(output, target_chunk)`` returns one micro-batch's loss; ``train_step(...,
loss_divisor=d)`` back-propagates ``loss_fn(...) / d``. ``scale_grads=False`` (our default; PyTorch's is True)
keeps the gradient the plain sum over micro-batches, so with ``loss_fn = token_loss_sum`` and ``d`` = the
step's global valid-token count the gradient is exactly that of the batch's mean token loss, however padding
falls (the ``GradientAccumulation`` convention). ``train_step`` returns the sum of the undivided micro-batch
losses (their mean with ``scale_grads=True``) on the last-stage rank, or on every rank with ``broadcast_loss=True``.

Tied weights. A Parameter that appears in several stage modules (the GPT's head tied to the token embedding)
is found by identity when the schedule is built, and kept by its names in those stages (a stage wrapped later in
FSDP2 holds a new, sharded parameter under the same name). If its stages sit on one rank (V style) and are not
wrapped apart, autograd already sums both uses. If they sit on different ranks (loop style: embedding on rank 0,
head on rank p - 1; both copies start equal because every rank builds the model from the same seed), or on one
rank in two separately wrapped stages, ``sync_tied_grads()`` sums the gradients (local copies, then an all-reduce
over ``pp_group``: Megatron's embedding all-reduce). ``train_step`` calls it unless ``sync_tied=False``; when
accumulating several train_steps into one optimizer step pass ``sync_tied=False`` and call it once at the end.

Bad input raises ``ValueError`` before the first send/recv, on every rank: unknown kind, ``pp_group`` size vs
number of stages, too few micro-batches (1F1B, DualPipeV), a batch not divisible by ``n_microbatches``.
Per-step checks agree across ranks through one 1-element all-reduce, so a rank never waits for a peer that failed.

Receives posted early (``early_recv=True``, the default). gloo moves a message only once its receive is posted,
and PyTorch posts most receives right before the compute that needs them, so the receiver waits for the transfer.
Kind ``gpipe`` runs ``ScheduleGPipeEarlyRecv`` (``gpipe_early_recv.py``: each receive one micro-batch ahead).
The multi-stage kinds run PyTorch's class with its lowered action list (``pipeline_order_with_comms``) passed
through ``early_recv.post_receives_early`` (receives moved up, per-peer order kept; on a non-gloo backend never
above a send to the same peer); ``1f1b`` runs the same ``Schedule1F1B`` order on PyTorch's
``_PipelineScheduleRuntime`` so that its receives can move too. ``early_recv=False`` runs PyTorch's classes as they
are (the bench's ``*-torch`` rows). Only posting order changes: every compute runs in PyTorch's order.
``recv_order`` holds every rank's action list the runtime runs (None for gpipe and with ``early_recv=False``).

Measured timeline: ``record=True`` times every ``forward_one_chunk`` (plus the loss on the last stage) as F,
``backward_one_chunk`` as B (or I when the schedule splits backward) and ``backward_weight_one_chunk`` as W,
relative to a barrier at the start of the step. ``measured_timeline()`` gathers them into a ``Timeline``; its
idle fraction counts everything that is not stage compute (waiting for peers, send/recv, schedule overhead).
Its ``meta["p2p_wait_s"]``, ``meta["p2p_post_send_s"]``, ``meta["p2p_post_recv_s"]`` hold, per rank, the
seconds inside the step's waits on sends/receives, inside posting sends and inside posting receives (within the
timeline's span): the rest of the idle time is the schedule's own per-action Python.
"""

from __future__ import annotations

import contextlib
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

from .early_recv import missing_runtime_internals, one_f_one_b_runtime, use_early_receives
from .sim import KINDS, Event, Timeline, action_lists, check_schedule, normalize_kind, stage_placement


def layer_split(n_layer: int, n_stages: int, layers_per_stage=None) -> list[int]:
    """Blocks per stage. Without ``layers_per_stage`` the split must be even: ``n_layer`` not divisible by
    ``n_stages`` (= pp ranks x stages per rank) is an error, never a silently smaller or lopsided model (Megatron #468).
    An explicit ``layers_per_stage`` must sum to ``n_layer``; the first and last stage may hold 0 blocks."""
    if layers_per_stage is None:
        if n_stages < 1 or n_layer % n_stages:
            raise ValueError(
                f"model.n_layer={n_layer} is not divisible by the number of pipeline stages {n_stages} "
                f"(pp ranks x stages per rank); change n_layer or pass layers_per_stage=[...] for an uneven split"
            )
        return [n_layer // n_stages] * n_stages
    counts = list(layers_per_stage)
    if len(counts) != n_stages or sum(counts) != n_layer or any(
        isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts
    ):
        raise ValueError(
            f"layers_per_stage={counts} must be {n_stages} non-negative integers summing to model.n_layer={n_layer}"
        )
    if any(c == 0 for c in counts[1:-1]):
        raise ValueError(f"layers_per_stage={counts}: a middle stage needs at least one block")
    return counts


def _group_size_rank(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "PipelineSchedule needs an initialised process group (torchrun, or curry_train.distributed.launch)"
        )
    return dist.get_world_size(group), dist.get_rank(group)


class PipelineSchedule:
    def __init__(self, kind: str, n_microbatches: int, stages, pp_group=None, loss_fn=None, *,
                 device=None, scale_grads: bool = False, record: bool = False, early_recv: bool = True):
        kind = normalize_kind(kind)
        stages = list(stages)
        p, rank = _group_size_rank(pp_group)
        if not stages or len(stages) % p:
            raise ValueError(f"pp_group has {p} ranks but {len(stages)} stage modules were given; schedule {kind!r} "
                             f"needs pp x stages-per-rank modules ({KINDS[kind][2][0]} per rank at least)")
        v = len(stages) // p
        check_schedule(kind, p, n_microbatches, v)  # m < stages, stages per rank: raised before any send/recv
        if loss_fn is None:
            raise ValueError("loss_fn is required: train_step runs backward from the last stage's loss")
        self.kind, self.n_microbatches, self.p, self.v, self.rank = kind, int(n_microbatches), p, v, rank
        self.n_stages, self.group, self.scale_grads = p * v, pp_group, scale_grads
        self.placement = stage_placement(kind, p, v)
        self.stage_ids = self.placement[rank]
        self.first_rank = next(r for r, ids in enumerate(self.placement) if 0 in ids)
        self.last_rank = next(r for r, ids in enumerate(self.placement) if self.n_stages - 1 in ids)
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
        self.modules = {s: stages[s] for s in self.stage_ids}
        self._tied = self._find_tied(stages)
        self._user_loss_fn, self.record, self.events, self.p2p_events, self._t0 = loss_fn, record, [], [], 0.0
        self.losses: list[torch.Tensor] = []
        self._loss_divisor = 1.0

        from torch.distributed import pipelining  # imported here: a slow import, paid only by processes that pipeline

        from .gpipe_early_recv import ScheduleGPipeEarlyRecv, missing_torch_internals

        self.stages = [pipelining.PipelineStage(self.modules[s], s, self.n_stages, self.device, group=pp_group)
                       for s in self.stage_ids]
        for st in self.stages:
            self._instrument(st)
        self.early_recv = bool(early_recv)
        cls = getattr(pipelining, KINDS[kind][0])
        missing = (missing_torch_internals() if kind == "gpipe" else missing_runtime_internals()) if early_recv else []
        if missing:
            warnings.warn(f"torch {torch.__version__} lacks {', '.join(missing)}: running PyTorch's {cls.__name__} "
                          "(receives posted late) instead of the early-receive order", stacklevel=2)
            self.early_recv = False
        arg = self.stages[0] if v == 1 and kind in ("gpipe", "1f1b") else self.stages
        if kind == "gpipe" and self.early_recv:
            self.schedule = ScheduleGPipeEarlyRecv(arg, n_microbatches=self.n_microbatches, loss_fn=self._loss,
                                                   scale_grads=scale_grads)
        elif kind == "1f1b" and self.early_recv:
            self.schedule = one_f_one_b_runtime(arg, self.n_microbatches, action_lists("1f1b", p, self.n_microbatches),
                                                self._loss, scale_grads)
        else:
            self.schedule = cls(arg, n_microbatches=self.n_microbatches, loss_fn=self._loss, scale_grads=scale_grads)
        self.recv_order = None  # every rank's lowered action order with receives moved up (runtime kinds)
        if kind != "gpipe" and self.early_recv:
            # gloo runs each send/recv on its own; a stream-ordered backend (NCCL) keeps receives behind sends
            self.recv_order = use_early_receives(self.schedule, keep_after_sends=dist.get_backend(pp_group) != "gloo")

    # ---- tied weights -------------------------------------------------------------------------------------------
    def _find_tied(self, stages) -> list[dict]:
        """Parameters shared by several stages (found by identity in the modules as given): per tie, the places
        ``[(stage, name in that stage)]`` and the holder ranks. Names, not objects, are kept: wrapping a stage later
        (FSDP2, which swaps in sharded parameters) replaces the object, and two stages of one rank wrapped apart
        then hold two copies. Every rank computes the same list in the same order, so the all-reduces match up."""
        owners: dict[int, list[tuple[int, str]]] = {}
        for s, module in enumerate(stages):
            for name, param in module.named_parameters(remove_duplicate=False):
                places = owners.setdefault(id(param), [])
                if not any(t == s for t, _ in places):
                    places.append((s, name))
        stage_rank = {s: r for r, ids in enumerate(self.placement) for s in ids}
        return [{"places": places, "ranks": sorted({stage_rank[s] for s, _ in places}), "shape": None}
                for places in owners.values() if len(places) > 1]

    def _tied_here(self, tie) -> list[nn.Parameter]:
        """This rank's distinct parameter objects of ``tie`` (one before wrapping, one per stage after)."""
        seen: dict[int, nn.Parameter] = {}
        for s, name in tie["places"]:
            if s in self.modules:
                p = self.modules[s].get_parameter(name)
                seen.setdefault(id(p), p)
        return list(seen.values())

    def owns(self, param: nn.Parameter) -> bool:
        """False for a copy of a tied parameter that another rank (or another local stage) counts: count each tie
        once, e.g. in norms."""
        for tie in self._tied:
            here = self._tied_here(tie)
            if any(p is param for p in here):
                return self.rank == tie["ranks"][0] and here[0] is param
        return True

    def sync_tied_grads(self) -> None:
        """Sum the gradients of tied parameters: over this rank's copies, then over ``pp_group`` when the tie spans
        ranks (ranks without it add zeros of the holders' local shape). Every copy then holds the sum. A sharded
        (DTensor) gradient is summed shard by shard: the holders of one pp group share their dp/tp coordinates."""
        for tie in self._tied:
            here = self._tied_here(tie)
            local = []
            for p in here:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                local.append(p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad)
            if len(tie["ranks"]) == 1 and len(local) < 2:
                continue  # one copy on one rank: autograd already summed its uses
            total = torch.stack(local).sum(0) if local else None
            if len(tie["ranks"]) > 1:
                if tie["shape"] is None:  # the holders' local shape, learnt once (non-holders send zeros)
                    shapes = [None] * self.p
                    mine = (tuple(total.shape), total.dtype) if total is not None else None
                    dist.all_gather_object(shapes, mine, group=self.group)
                    tie["shape"] = next(x for x in shapes if x is not None)
                if total is None:
                    total = torch.zeros(tie["shape"][0], dtype=tie["shape"][1], device=self.device)
                dist.all_reduce(total, group=self.group)
            for g in local:
                g.copy_(total)

    @property
    def reduces_grads(self) -> bool:
        """Whether the stages reduce their own gradients over data-parallel ranks: PyTorch's pipelining runtime
        drives an FSDP2 (or DDP) stage's gradient sync (``PipelineStage.perform_reduce_grad`` after the last
        micro-batch). False for plain stages, whose gradients the caller averages."""
        from torch.distributed.fsdp import FSDPModule
        from torch.nn.parallel import DistributedDataParallel

        return any(isinstance(st.submod, (FSDPModule, DistributedDataParallel)) for st in self.stages)

    # ---- measured timeline --------------------------------------------------------------------------------------
    def _instrument(self, stage) -> None:
        fwd, bwd, bwd_w = stage.forward_one_chunk, stage.backward_one_chunk, stage.backward_weight_one_chunk
        sid = stage.stage_index

        def timed(kind, fn, mb, *args, **kwargs):
            if not self.record:
                return fn(mb, *args, **kwargs)
            t = time.perf_counter()
            out = fn(mb, *args, **kwargs)
            k = kind if kind != "B" or kwargs.get("full_backward", True) else "I"
            self.events.append([self.rank, sid, k, mb, t - self._t0, time.perf_counter() - self._t0])
            return out

        stage.forward_one_chunk = lambda mb, *a, **k: timed("F", fwd, mb, *a, **k)
        stage.backward_one_chunk = lambda mb, *a, **k: timed("B", bwd, mb, *a, **k)
        stage.backward_weight_one_chunk = lambda mb, *a, **k: timed("W", bwd_w, mb, *a, **k)

    @contextlib.contextmanager
    def _timed_p2p(self):
        """With ``record``: time each post (``_batch_p2p``) and each wait (``_wait_batch_p2p``) of a send/receive,
        by swapping PyTorch's module functions for the step (every schedule calls them through the module)."""
        from torch.distributed.pipelining import schedules

        if not self.record:
            yield
            return
        post, wait = schedules._batch_p2p, schedules._wait_batch_p2p

        def timed(kind, fn):
            def call(ops, *args, **kwargs):
                t = time.perf_counter()
                try:
                    return fn(ops, *args, **kwargs)
                finally:
                    sends_only = kind != "wait" and all(o.op is dist.isend for o in ops)
                    what = kind if kind == "wait" else "post_send" if sends_only else "post_recv"
                    self.p2p_events.append([what, t - self._t0, time.perf_counter() - self._t0])
            return call

        schedules._batch_p2p, schedules._wait_batch_p2p = timed("post", post), timed("wait", wait)
        try:
            yield
        finally:
            schedules._batch_p2p, schedules._wait_batch_p2p = post, wait

    def _loss(self, output, target):
        loss = self._user_loss_fn(output, target)
        if self.record and self.events and self.events[-1][2] == "F":  # the loss belongs to the last stage's F
            self.events[-1][5] = time.perf_counter() - self._t0
        return loss / self._loss_divisor

    def measured_timeline(self) -> Timeline:
        """Gather the last recorded step's events from every rank of ``pp_group`` (collective) into a Timeline."""
        gathered = [None] * self.p
        dist.all_gather_object(gathered, (self.events, self.p2p_events), group=self.group)
        events = [Event(*e) for rank_events, _ in gathered for e in rank_events]
        lo, hi = min(e.start for e in events), max(e.end for e in events)
        p2p = {kind: [sum(max(0.0, min(end, hi) - max(start, lo)) for k, start, end in rank_p2p if k == kind)
                      for _, rank_p2p in gathered] for kind in ("post_send", "post_recv", "wait")}
        return Timeline(events, self.p, label=f"{self.kind} measured (p={self.p}, m={self.n_microbatches}, v={self.v})",
                        meta={"kind": self.kind, "p": self.p, "m": self.n_microbatches, "v": self.v,
                              "p2p_wait_s": p2p["wait"], "p2p_post_send_s": p2p["post_send"],
                              "p2p_post_recv_s": p2p["post_recv"]})

    # ---- one step -----------------------------------------------------------------------------------------------
    def _input_error(self, batch, target) -> str:
        m = self.n_microbatches
        for holder, stage, name, tensor in [(self.first_rank, "stage 0", "batch", batch),
                                            (self.last_rank, "the last stage", "target", target)]:
            if self.rank != holder:
                continue
            if not isinstance(tensor, torch.Tensor):
                return f"rank {self.rank} holds {stage} and needs the {name} tensor, got {type(tensor).__name__}"
            if tensor.shape[0] % m:
                return (f"{name} of {tensor.shape[0]} rows is not divisible by n_microbatches={m} "
                        f"(schedule {self.kind!r})")
        return ""

    def train_step(self, batch=None, target=None, *, loss_divisor: float = 1.0, broadcast_loss: bool = False,
                   sync_tied: bool = True, stage_kwargs: dict | None = None):
        """Forward + backward of ``batch`` in ``n_microbatches`` chunks, each back-propagating
        ``loss_fn / loss_divisor``; returns the step loss (see module doc). ``stage_kwargs``: keyword inputs every
        stage's forward gets, each tensor split into the micro-batches by rows like ``batch`` (pass them on every
        rank; e.g. context parallelism's global positions, ``(B, T)``)."""
        error = self._input_error(batch, target)
        flag = torch.tensor([1.0 if error else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)  # every rank learns of any rank's bad input
        if flag.item():
            raise ValueError(error or "a peer rank of the pipeline rejected its input (see its error)")
        self.events, self.p2p_events, self._loss_divisor = [], [], float(loss_divisor)
        if self.record:
            dist.barrier(group=self.group)
            self._t0 = time.perf_counter()
        args = (batch.to(self.device),) if self.rank == self.first_rank else ()
        kwargs = {}
        if self.rank == self.last_rank:
            kwargs = {"target": target.to(self.device), "losses": []}
        with self._timed_p2p():
            self.schedule.step(*args, **kwargs, **(stage_kwargs or {}))
        self.losses = [t.detach() for t in kwargs.get("losses", [])]
        if sync_tied:
            self.sync_tied_grads()
        loss = None
        if self.rank == self.last_rank:
            loss = torch.stack(self.losses).sum() * self._loss_divisor  # the losses back-propagated were divided
            if self.scale_grads:
                loss = loss / self.n_microbatches
        if broadcast_loss:
            buf = loss.detach().reshape(1).float() if loss is not None else torch.zeros(1, device=self.device)
            src = dist.get_global_rank(self.group or dist.group.WORLD, self.last_rank)
            dist.broadcast(buf, src=src, group=self.group)
            loss = buf[0]
        return loss

    def parameters(self):
        """Unique parameters of this rank's stages (a tied weight shared by two local stages appears once)."""
        return list(nn.ModuleList(self.modules.values()).parameters())

    def __repr__(self) -> str:
        return (f"PipelineSchedule(kind={self.kind!r}, n_microbatches={self.n_microbatches}, pp={self.p}, "
                f"stages_per_rank={self.v}, rank {self.rank} holds stages {self.stage_ids})")
