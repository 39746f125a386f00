"""Expert parallelism under ZeRO-1 (``model=moe``, ``parallel.ep=2`` in dp 4, ``parallel.sharding=zero1``): the dense
parameters' AdamW state sharded over the 4 dp ranks, each expert slice's over the 2 ranks holding it
(``primitives.zero1``). The run equals one process, each rank holds the state ZeRO-1 promises, and its checkpoint
resumes in one process and at ep 1 under DDP."""

import shutil

import pytest
import torch

from curry_train.config import load_config
from curry_train.distributed import launch
from curry_train.train import train
from tiny_runs import train_keeping_model

# no capacity limit, no balancing loss: the MoE parity tests' setting; grad_clip=0.5 clips every step
BASE = ["model=moe", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.moe_experts=4",
        "model.moe_capacity_factor=100", "model.moe_aux_loss_weight=0", "train.seq_len=32", "train.batch_size=8",
        "train.gradient_accumulation_steps=2", "train.steps=3", "train.warmup_steps=2", "train.grad_clip=0.5",
        "train.progress=false", "train.log_every=0", "data.max_bytes=50000"]
EP_ZERO1 = ["parallel.ep=2", "parallel.sharding=zero1"]
CKPT = ["checkpoint.every=2", "checkpoint.keep_last=0"]
COMPOSED = {  # world size 4, each against the same one process
    # plain pipeline stages: ep2 is each stage's 2 dp ranks (one rank per slice: its state in a plain AdamW)
    "pp2 x dp2 x ep2": ["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.n_microbatches=2"],
    # ep2 cut from dp2 x cp2: the slices' state over the 2 ranks holding them, the dense state over all 4
    "dp2 x cp2 x ep2": ["parallel.cp=2"],
}


def _train_keeping_state(overrides):
    """The run's (step, loss, grad norm) and, per parameter name, the bytes of the AdamW moments this rank holds
    (``exp_avg`` + ``exp_avg_sq``; the scalar ``step`` aside)."""
    from curry_train.primitives.zero1 import local_optimizers

    history, model, optimizer = train_keeping_model(overrides)
    names = {id(p): n for n, p in model.named_parameters()}
    held = {names[id(p)]: sum(v.numel() * v.element_size() for v in s.values() if torch.is_tensor(v) and v.dim())
            for local in local_optimizers(optimizer) for p, s in local.state.items()}
    return [(m["step"], m["loss"], m["grad_norm"]) for m in history], held, type(optimizer).__name__


def _ep_zero1(rank, ws, tmp):
    """3 steps saving at 2; the ``COMPOSED`` layouts; then the step-2 checkpoint resumed at ep 1 under DDP (plain
    [E, ...] banks)."""
    from curry_train.primitives.checkpoint_layout import step_dirname

    straight = _train_keeping_state(BASE + EP_ZERO1 + CKPT + [f"checkpoint.dir={tmp / 'saved'}"])
    composed = {name: _train_keeping_state(BASE + EP_ZERO1 + extra)[0] for name, extra in COMPOSED.items()}
    torch.distributed.barrier()
    if rank == 0:
        for name in ("ep1", "one"):
            shutil.copytree(tmp / "saved" / step_dirname(2), tmp / name / step_dirname(2))
            (tmp / name / "latest").write_text(step_dirname(2))
    torch.distributed.barrier()
    at_ep1 = [(m["step"], m["loss"], m["grad_norm"]) for m in train(load_config(BASE + CKPT + [
        f"checkpoint.dir={tmp / 'ep1'}"]))]
    return straight, at_ep1, composed


def _close(run, reference):
    assert [s for s, *_ in run] == [s for s, *_ in reference]
    for (_, loss, norm), (_, ref_loss, ref_norm) in zip(run, reference, strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5)


@pytest.mark.timeout(500)
@pytest.mark.slow
def test_expert_parallel_zero1_matches_one_process_shards_state_and_resumes(tmp_path):
    reference, full, kind = _train_keeping_state(BASE)
    assert kind == "AdamW" and all(norm > 0.5 for *_, norm in reference)
    ranks = launch(_ep_zero1, 4, tmp_path, timeout=480)
    runs = [r[0][0] for r in ranks]
    assert all(r[0][2] == "ShardedOptimizers" for r in ranks)
    assert all(run == runs[0] for run in runs)
    _close(runs[0], reference)  # 3 optimizer steps, gradient accumulation 2, clipped by the whole model's norm
    for name in COMPOSED:
        for r in ranks:
            _close(r[2][name], reference)

    held = [r[0][1] for r in ranks]
    experts = {n for n in full if ".experts.w" in n}
    dense = set(full) - experts
    assert len(experts) == 3 and dense
    # dense: each parameter's moments on exactly one of the 4 dp ranks, whole; ~1/4 of a replica's per rank
    # (greedy partition by size: at most the even share plus one parameter's)
    assert all(sum(n in h for h in held) == 1 for n in dense)
    assert all(h[n] == full[n] for h in held for n in dense if n in h)
    dense_total = sum(full[n] for n in dense)
    for h in held:
        assert sum(v for n, v in h.items() if n in dense) <= dense_total / 4 + max(full[n] for n in dense)
    # experts: rank r holds experts [2 (r % 2), 2 (r % 2) + 2); each slice's moments (half a bank's) on exactly one
    # of the 2 ranks holding it (ranks r and r + 2: ParallelState.expert_dp_ranks); ~1/2 of the slice's per rank
    for pair in ((0, 2), (1, 3)):
        assert all(sum(n in held[r] for r in pair) == 1 for n in experts)
        assert all(held[r][n] * 2 == full[n] for r in pair for n in experts if n in held[r])
        for r in pair:
            share = sum(v for n, v in held[r].items() if n in experts)
            assert share <= sum(full[n] for n in experts) / 2 / 2 + max(full[n] for n in experts) / 2

    one = [(m["step"], m["loss"], m["grad_norm"]) for m in train(load_config(BASE + CKPT + [
        f"checkpoint.dir={tmp_path / 'one'}"]))]
    for resumed in (one, *(r[1] for r in ranks)):  # one process, and ep 1 under DDP in dp 4
        _close(resumed, runs[0][2:])
