"""Receives posted early in PyTorch's multi-stage schedules, and a checker for any lowered action order.

PyTorch lowers a multi-stage schedule (``_PipelineScheduleRuntime``: interleaved, looped BFS, ZB, ZBV, DualPipeV)
into per-rank lists with ``SEND_F``/``RECV_F``/``SEND_B``/``RECV_B`` actions (``_add_send_recv``). A receive lands
in the receiver's list where the lowering happened to schedule the matching send, often right before the compute
that needs it. gloo moves a message only once its receive is posted, so the receiver then waits for the transfer.
``post_receives_early`` moves every RECV up in its rank's list; the runtime posts it as a non-blocking ``irecv``
and waits on it only at the consuming compute, which is unchanged.

Contract of ``post_receives_early(order, stage_to_rank, ahead=None, keep_after_sends=False)``:

* only RECV actions move, and only earlier; every other action keeps its relative order;
* a RECV never moves above an earlier RECV from the same peer rank: point-to-point messages between two ranks
  match in the order they are posted, so the k-th receive from a peer still gets that peer's k-th send;
* ``ahead=n`` posts a RECV at most n compute actions before its consumer (``ahead=None``: as early as the rules
  allow, i.e. at the top of the list, after the receives from the same peer before it);
* ``keep_after_sends=True`` also keeps a RECV below every SEND to the same peer that preceded it. That is needed
  where a pair's sends and receives run in posting order on one stream (NCCL: a receive posted ahead of a send
  to the same peer can wait for a message the peer sends only after our send completes: a cycle). gloo runs each
  send and receive on its own, so ``PipelineSchedule`` passes ``keep_after_sends=(backend != "gloo")``.

``split_overlaps(order)``: PyTorch lowers an ``OVERLAP_F_B`` (DualPipeV's forward of one micro-batch paired with the
backward of another) as one entry followed by both sends, so the forward's activation leaves only after the
backward ran too. Without a custom function registered for ``OVERLAP_F_B`` the runtime runs the two one after
the other anyway; the split lists them as two entries, each followed by its own send (the order of every send and
receive is unchanged, only the backward moves below the forward's send).

``check_comms(order, stage_to_rank, stream_ordered=False)`` runs a lowered order without processes: posts are
non-blocking, a compute waits for its receive, the k-th receive on a channel gets the channel's k-th send (with
``stream_ordered`` every op of a rank pair also completes in posting order, rendezvous style). It raises
``ValueError`` on a compute before its receive, a receive that would get another message, a deadlock, or a send
nobody receives.
"""

from __future__ import annotations

from collections import defaultdict

RECVS = ("RECV_F", "RECV_B")
SENDS = ("SEND_F", "SEND_B")


def _ctype(action) -> str:
    return action.computation_type.name if hasattr(action.computation_type, "name") else str(action.computation_type)


def _kind(action) -> str:
    """One of F, B, I, W, OVERLAP_F_B, SEND_F, RECV_F, SEND_B, RECV_B, or another runtime action's name."""
    return {"FORWARD": "F", "FULL_BACKWARD": "B", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W"}.get(
        _ctype(action), _ctype(action))


def peer(action, stage_to_rank) -> int | None:
    """The rank a SEND goes to or a RECV comes from; None for any other action."""
    kind, s = _kind(action), action.stage_index
    if kind in ("RECV_F", "SEND_B"):
        return stage_to_rank(s - 1)
    if kind in ("RECV_B", "SEND_F"):
        return stage_to_rank(s + 1)
    return None


def _computes(action) -> list:
    """The compute actions an entry runs (the sub-actions of an OVERLAP_F_B)."""
    if _kind(action) == "OVERLAP_F_B":
        return list(action.sub_actions)
    return [action] if _kind(action) in ("F", "B", "I", "W") else []


def _consumes(compute, recv) -> bool:
    same = compute.stage_index == recv.stage_index and compute.microbatch_index == recv.microbatch_index
    return same and (_kind(compute) == "F" if _kind(recv) == "RECV_F" else _kind(compute) in ("B", "I"))


def post_receives_early(order: dict, stage_to_rank, ahead: int | None = None, keep_after_sends: bool = False) -> dict:
    """``{rank: actions}`` with every RECV moved up as the module docstring says (a new dict; ``order`` is kept)."""
    if ahead is not None and (isinstance(ahead, bool) or not isinstance(ahead, int) or ahead < 0):
        raise ValueError(f"ahead must be a non-negative integer or None (as early as allowed), got {ahead!r}")
    return {rank: _reorder_rank(list(actions), stage_to_rank, ahead, keep_after_sends)
            for rank, actions in order.items()}


def _reorder_rank(actions: list, stage_to_rank, ahead, keep_after_sends) -> list:
    others = [a for a in actions if a is not None and _kind(a) not in RECVS]
    compute_slots = [k for k, a in enumerate(others) if _computes(a)]  # index in `others` of the n-th compute entry
    slot_of: dict[int, list] = defaultdict(list)  # index in `others` -> receives posted right before it
    last_slot: dict[int, int] = {}  # peer -> slot of its latest receive (their order is kept)
    last_send: dict[int, int] = {}  # peer -> index in `others` just after the latest send to it seen so far
    n_others = 0
    for a in actions:
        if a is None:
            continue
        if _kind(a) not in RECVS:
            if _kind(a) in SENDS:
                last_send[peer(a, stage_to_rank)] = n_others + 1
            n_others += 1
            continue
        src, original = peer(a, stage_to_rank), n_others
        slot = 0
        if ahead is not None:
            consumer = next((k for k in range(original, len(others))
                             if any(_consumes(c, a) for c in _computes(others[k]))), None)
            if consumer is None:
                raise ValueError(f"{a} has no compute after it that consumes it")
            n = compute_slots.index(consumer)
            slot = compute_slots[n - ahead] if n >= ahead else 0
        if keep_after_sends:
            slot = max(slot, last_send.get(src, 0))
        slot = max(min(slot, original), last_slot.get(src, 0))
        last_slot[src] = slot
        slot_of[slot].append(a)
    out = []
    for k in range(len(others) + 1):
        out += slot_of.get(k, [])
        if k < len(others):
            out.append(others[k])
    return out


def _sends_of(compute, entry) -> bool:
    kind = _kind(entry)
    if entry.stage_index != compute.stage_index or entry.microbatch_index != compute.microbatch_index:
        return False
    return kind == "SEND_F" if _kind(compute) == "F" else kind == "SEND_B" and _kind(compute) in ("B", "I")


def split_overlaps(order: dict) -> dict:
    """``{rank: actions}`` with every ``OVERLAP_F_B`` replaced by its sub-actions, each followed by the sends it
    produced (which PyTorch's lowering put right after the combined entry); a new dict."""
    out = {}
    for rank, actions in order.items():
        actions = [a for a in actions if a is not None]
        new, k = [], 0
        while k < len(actions):
            a = actions[k]
            k += 1
            if _kind(a) != "OVERLAP_F_B":
                new.append(a)
                continue
            sends = []
            while k < len(actions) and _kind(actions[k]) in SENDS:
                sends.append(actions[k])
                k += 1
            for sub in a.sub_actions:
                new.append(sub)
                new += [x for x in sends if _sends_of(sub, x)]
            unmatched = [x for x in sends if not any(_sends_of(sub, x) for sub in a.sub_actions)]
            new += unmatched  # sends of earlier entries that followed this one: kept after it, in their order
        out[rank] = new
    return out


def _message(action) -> tuple:
    """What a SEND carries or a RECV expects: (direction, receiving stage, micro-batch)."""
    kind, s, mb = _kind(action), action.stage_index, action.microbatch_index
    return {"SEND_F": ("F", s + 1, mb), "RECV_F": ("F", s, mb),
            "SEND_B": ("B", s - 1, mb), "RECV_B": ("B", s, mb)}[kind]


def check_comms(order: dict, stage_to_rank, stream_ordered: bool = False) -> None:
    """Run ``order`` (``{rank: lowered actions}``) on a model of the runtime; raise ``ValueError`` if it cannot run
    as written (see the module docstring). Returns None when every rank finishes and every message matched."""
    lists = {r: [a for a in acts if a is not None] for r, acts in order.items()}
    n_stages = 1 + max(c.stage_index for acts in lists.values() for a in acts for c in _computes(a))
    pos = dict.fromkeys(lists, 0)
    sent: dict[tuple, list] = defaultdict(list)  # (src, dst) -> messages posted, in order
    posted_recvs: dict[tuple, list] = defaultdict(list)  # (src, dst) -> expected messages, in order
    recv_slot: dict[tuple, tuple] = {}  # (rank, message) -> (channel, index) of its posted receive
    stream: dict[tuple, list] = defaultdict(list)  # (rank, peer) -> ops not yet complete: ("send"|"recv", channel, k)
    done: set = set()  # completed ("recv", channel, k) / ("send", channel, k)

    def complete_streams() -> bool:
        moved = False
        for (r, q), ops in stream.items():
            while ops:
                op, channel, k = ops[0]
                partner = ("recv" if op == "send" else "send", channel, k)
                other = stream.get((q, r), [])
                if partner in done or (other and other[0] == partner):
                    ops.pop(0)
                    done.add((op, channel, k))
                    moved = True
                else:
                    break
        return moved

    def recv_ready(rank, message) -> bool:
        channel, k = recv_slot[(rank, message)]
        if stream_ordered:
            return ("recv", channel, k) in done
        return len(sent[channel]) > k

    while any(pos[r] < len(lists[r]) for r in lists):
        progressed = complete_streams() if stream_ordered else False
        for r in lists:
            while pos[r] < len(lists[r]):
                a = lists[r][pos[r]]
                kind = _kind(a)
                if kind in SENDS or kind in RECVS:
                    q = peer(a, stage_to_rank)
                    channel = (r, q) if kind in SENDS else (q, r)
                    queue = sent if kind in SENDS else posted_recvs
                    k = len(queue[channel])
                    queue[channel].append(_message(a))
                    if kind in RECVS:
                        recv_slot[(r, _message(a))] = (channel, k)
                        if len(sent[channel]) > k and sent[channel][k] != _message(a):
                            raise ValueError(f"rank {r}: {a} would receive {sent[channel][k]} (posting order differs "
                                             f"from rank {q}'s sends)")
                    else:
                        expected = posted_recvs[channel]
                        if len(expected) > k and expected[k] != _message(a):
                            raise ValueError(f"rank {q}: its receive {expected[k]} would get {_message(a)} sent by "
                                             f"rank {r} ({a})")
                    if stream_ordered:
                        stream[(r, q)].append(("send" if kind in SENDS else "recv", channel, k))
                else:
                    waiting = False
                    for c in _computes(a):
                        need = _input_message(c, stage_to_rank, r, n_stages)
                        if need is None:
                            continue
                        if (r, need) not in recv_slot:
                            raise ValueError(f"rank {r}: {c} runs before its receive is posted")
                        waiting = waiting or not recv_ready(r, need)
                    if waiting:
                        break
                pos[r] += 1
                progressed = True
                if stream_ordered:
                    complete_streams()
        if not progressed:
            stuck = ", ".join(f"rank {r} at {lists[r][pos[r]]}" for r in lists if pos[r] < len(lists[r]))
            raise ValueError(f"deadlock: {stuck}")
    for channel, messages in sent.items():
        if messages != posted_recvs.get(channel, []):
            raise ValueError(f"channel {channel[0]}->{channel[1]}: sends {messages} but receives "
                             f"{posted_recvs.get(channel, [])}")
    if stream_ordered:
        while complete_streams():
            pass
        left = {k: v for k, v in stream.items() if v}
        if left:
            raise ValueError(f"deadlock at the end of the step: ops never completed {left}")


def _input_message(compute, stage_to_rank, rank, n_stages):
    """The message a compute waits for from another rank, or None (first/last stage, or its neighbour is local)."""
    kind, s, mb = _kind(compute), compute.stage_index, compute.microbatch_index
    if kind == "F" and s > 0 and stage_to_rank(s - 1) != rank:
        return ("F", s, mb)
    if kind in ("B", "I") and s < n_stages - 1 and stage_to_rank(s + 1) != rank:
        return ("B", s, mb)
    return None


def lowered_order(schedule) -> dict:
    """``{rank: actions}`` PyTorch lowered ``schedule`` (a ``_PipelineScheduleRuntime``) to, comms included."""
    return {r: list(a) for r, a in schedule.pipeline_order_with_comms.items()}


def use_early_receives(schedule, keep_after_sends: bool, ahead: int | None = None) -> dict:
    """Replace ``schedule``'s lowered order (every rank's) by ``post_receives_early`` of it (after
    ``split_overlaps`` where no custom ``OVERLAP_F_B`` function is registered), through the runtime's own
    ``_prepare_schedule_with_comms(..., format="compute_comms")``; returns the new order."""
    mapping = schedule.stage_index_to_group_rank
    order = lowered_order(schedule)
    if not any(getattr(t, "name", t) == "OVERLAP_F_B" for t in getattr(schedule, "_comp_type_to_function_map", {})):
        order = split_overlaps(order)
    order = post_receives_early(order, mapping.__getitem__, ahead, keep_after_sends)
    schedule._prepare_schedule_with_comms(order, format="compute_comms")
    return order


def missing_runtime_internals() -> list[str]:
    """The private PyTorch names the early-receive orders rely on that this torch lacks (written against 2.13);
    ``PipelineSchedule`` then keeps PyTorch's own order, with a warning."""
    from torch.distributed.pipelining import schedules

    needed = [(schedules, n) for n in ("_Action", "_ComputationType", "_PipelineScheduleRuntime")]
    needed += [(getattr(schedules, "_PipelineScheduleRuntime", object), "_prepare_schedule_with_comms")]
    return [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in needed if not hasattr(owner, name)]


def one_f_one_b_runtime(stage, n_microbatches: int, compute_order: list[list], loss_fn, scale_grads: bool):
    """1F1B on ``_PipelineScheduleRuntime`` (one stage per rank) from ``compute_order`` (``sim.action_lists``:
    per rank, objects with ``stage``, ``kind`` F/B, ``mb``, the order ``Schedule1F1B`` runs); PyTorch lowers it
    (``_add_send_recv``), ``use_early_receives`` can then move its receives."""
    from torch.distributed.pipelining import schedules

    ctype = {"F": schedules._ComputationType.FORWARD, "B": schedules._ComputationType.FULL_BACKWARD}
    runtime = schedules._PipelineScheduleRuntime([stage], n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    runtime.pipeline_order = {r: [schedules._Action(a.stage, ctype[a.kind], a.mb) for a in acts]
                              for r, acts in enumerate(compute_order)}
    runtime._prepare_schedule_with_comms(runtime.pipeline_order)
    return runtime
