"""The reference GPT with a mixture of experts (``model=moe``) from the CLI: the loss falls, the balancing loss is in
the backward, DDP at world size 2 gives the single-process losses, and a DCP checkpoint resumes bit for bit (also
under expert parallelism, where it holds the whole expert bank and loads at ep=1).
The router, experts and expert parallelism themselves: tests/primitives/test_moe_standalone.py."""

import json
import shutil

import pytest
import torch

from curry_train.__main__ import main
from curry_train.config import load_config
from curry_train.distributed import launch
from curry_train.model import GPT, GPTConfig
from curry_train.primitives.moe import MoEMLP
from curry_train.train import train
from tiny_runs import train_keeping_model

RUN = ["model=moe", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.moe_experts=4", "train.seq_len=32",
       "train.batch_size=4", "train.progress=false", "train.log_every=0", "data.max_bytes=50000"]


def test_moe_gpt_layout_and_active_flops():
    cfg = GPTConfig(n_layer=4, n_embd=32, n_head=2, moe_experts=4, moe_every=2, moe_top_k=1)
    model = GPT(cfg)
    assert [isinstance(b.mlp, MoEMLP) for b in model.blocks] == [True, False, True, False]
    dense = GPT(GPTConfig(n_layer=4, n_embd=32, n_head=2))
    bank = sum(p.numel() for p in model.blocks[0].mlp.experts.parameters())
    router = sum(p.numel() for p in model.blocks[0].mlp.router.parameters())
    # top-1 of 4 SwiGLU experts: each MoE layer's active weights = router + one expert (3 matrices of d x 4d)
    per_layer_active = router + bank // 4
    assert bank // 4 == 3 * 32 * 128 and model.flops_per_token(32) - dense.flops_per_token(32) == \
        6 * 2 * (per_layer_active - sum(p.numel() for p in dense.blocks[0].mlp.parameters()))


@pytest.mark.slow
def test_moe_trains_and_resumes_exactly(tmp_path):
    ckpt = [f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every=5", "checkpoint.keep_last=0"]
    steps = [json.loads(line)["loss"] for line in _run(tmp_path, "straight", 10, ckpt).read_text().splitlines()]
    assert steps[-1] < steps[0] - 0.5
    shutil.rmtree(tmp_path / "ckpt" / "step-00000010")
    (tmp_path / "ckpt" / "latest").write_text("step-00000005\n")  # roll back to step 5
    resumed = [json.loads(line)["loss"] for line in _run(tmp_path, "resumed", 10, ckpt).read_text().splitlines()]
    assert resumed == steps[5:]  # the routers, the experts and AdamW's moments all came back, bit for bit


def _run(tmp_path, name, steps, extra=()):
    metrics = tmp_path / f"{name}.jsonl"
    assert main(["train", *RUN, f"train.steps={steps}", "train.warmup_steps=2", f"train.metrics_file={metrics}",
                 *extra]) == 0
    return metrics


def test_the_balancing_loss_reaches_the_router():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, moe_experts=4, moe_aux_loss_weight=1.0))
    x = torch.randint(0, 256, (2, 16))
    model(x)
    aux = model.blocks[0].mlp.aux_loss
    aux.backward()
    assert aux.item() > 0 and all(p.grad.abs().sum() > 0 for p in model.blocks[0].mlp.router.parameters())


# Each data-parallel rank routes, caps and balances its own tokens (as Megatron and torchtitan do): capacity and the
# aux loss are per-rank statistics, so parity with one process holds without a capacity limit or aux loss.
PARITY = RUN + ["train.steps=4", "model.moe_capacity_factor=100", "model.moe_aux_loss_weight=0"]


def _ddp(rank, ws):
    return [m["loss"] for m in train(load_config(PARITY))]


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_moe_under_ddp_matches_one_process():
    reference = [m["loss"] for m in train(load_config(PARITY))]
    rank0, rank1 = launch(_ddp, 2, timeout=280)
    assert rank0 == rank1 and rank0 == pytest.approx(reference, abs=1e-5)


def _train_keeping_experts(overrides, moments=False):
    """The run's metrics and its expert banks after training (this rank's shard under parallel.ep > 1); with
    ``moments``, AdamW's ``exp_avg`` / ``exp_avg_sq`` of each bank too (keys ``<name>.exp_avg`` ...)."""
    history, model, optimizer = train_keeping_model(overrides)
    banks = {k: v.detach().clone() for k, v in model.state_dict().items() if ".experts.w" in k}
    if moments:
        for name, p in model.named_parameters():
            if name in banks:
                banks.update({f"{name}.{m}": optimizer.state[p][m].clone() for m in ("exp_avg", "exp_avg_sq")})
    return [(m["loss"], m["grad_norm"]) for m in history], banks


# grad_clip=0.5 clips every step here, so the grad norm over the ep ranks' expert shards must be exact too
EP_PARITY = PARITY + ["train.grad_clip=0.5"]


def _ep(rank, ws, extra):
    return _train_keeping_experts(EP_PARITY + ["parallel.ep=2", *extra])


# world size 2: ep = dp (no expert-data-parallel reduce), with gradient accumulation (DDP's no_sync); world size 4:
# dp 4, ep 2, so ranks 0 and 2 hold the same experts and sum their expert grads (and write the same checkpoint rows)
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size,extra", [(2, ["train.gradient_accumulation_steps=2"]), (4, [])])
@pytest.mark.slow
def test_expert_parallel_matches_one_process(world_size, extra, tmp_path):
    reference, full = _train_keeping_experts(EP_PARITY + extra)
    saving = [f"checkpoint.dir={tmp_path}", "checkpoint.every=4"] if world_size == 4 else []
    results = launch(_ep, world_size, extra + saving, timeout=280)
    (metrics0, bank0), (metrics1, bank1) = results[:2]
    assert all(norm > 0.5 for _, norm in reference)
    assert all(metrics == metrics0 for metrics, _ in results)
    assert all(torch.equal(bank[k], results[i % 2][1][k]) for i, (_, bank) in enumerate(results) for k in bank)
    for (loss, norm), (ref_loss, ref_norm) in zip(metrics0, reference, strict=True):
        assert loss == pytest.approx(ref_loss, abs=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5)
    assert full.keys() == bank0.keys() and len(full) == 3  # one MoE layer (model.moe_every=2): w1, w3, w2
    for name, weight in full.items():
        assert bank0[name].shape[0] == weight.shape[0] // 2  # each rank holds half the experts
        torch.testing.assert_close(torch.cat([bank0[name], bank1[name]]), weight, rtol=0, atol=1e-5)
    if saving:  # two replicas of each slice were saved: DCP kept one, the checkpoint holds the 4 experts once
        model, _ = _load_at_ep1(tmp_path, EP_PARITY)
        params = dict(model.named_parameters())
        assert all(torch.equal(params[name].detach(), torch.cat([bank0[name], bank1[name]])) for name in full)


def _load_at_ep1(ckpt, overrides):
    """One process, parallel.ep=1: the model and AdamW loaded from ``ckpt``'s latest checkpoint (DCP reshards)."""
    from curry_train.loop import build_optimizer
    from curry_train.primitives.checkpoint import Checkpointer
    from curry_train.user_model import build_model

    cfg = load_config(overrides)
    torch.manual_seed(1)  # not the run's seed: every loaded value must come from the checkpoint
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, (cfg.train.beta1, cfg.train.beta2))
    assert Checkpointer(ckpt).load(model, optimizer)["step"] == cfg.train.steps
    return model, optimizer


def _roll_back_to(ckpt, step):
    for later in ckpt.glob("step-*"):
        if int(later.name[len("step-"):]) > step:
            shutil.rmtree(later)
    (ckpt / "latest").write_text(f"step-{step:08d}\n")


EP_CKPT = EP_PARITY + ["checkpoint.every=2", "checkpoint.keep_last=0"]


def _ep_save_and_resume(rank, ws, ckpt):
    """ep=2: 4 steps with checkpoints at 2 and 4; back to step 2; resume (saving asynchronously) to step 4."""
    straight, banks = _train_keeping_experts(EP_CKPT + ["parallel.ep=2", f"checkpoint.dir={ckpt}"], moments=True)
    torch.distributed.barrier()
    if rank == 0:
        _roll_back_to(ckpt, 2)
    torch.distributed.barrier()
    resumed, resumed_banks = _train_keeping_experts(EP_CKPT + ["parallel.ep=2", f"checkpoint.dir={ckpt}",
                                                               "checkpoint.async_save=true"], moments=True)
    return straight, resumed, banks, resumed_banks


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_expert_parallel_checkpoints_hold_every_expert_and_resume(tmp_path):
    """An ep=2 checkpoint stores each bank (and its AdamW moments) whole, as [E, ...]: resuming at ep=2 repeats the
    losses bit for bit, one process at ep=1 reads the concatenation of the ranks' slices and resumes to 1e-5."""
    from torch.distributed.checkpoint import FileSystemReader

    ckpt = tmp_path / "ckpt"
    (straight, resumed, banks0, after0), (straight1, resumed1, banks1, after1) = launch(
        _ep_save_and_resume, 2, ckpt, timeout=280)
    assert straight == straight1 and resumed == resumed1 and resumed == straight[2:]  # bit for bit
    assert all(torch.equal(after0[k], banks0[k]) and torch.equal(after1[k], banks1[k]) for k in banks0)
    name = next(k for k in banks0 if k.endswith(".experts.w1"))
    stored = FileSystemReader(str(ckpt / "step-00000004")).read_metadata().state_dict_metadata
    assert banks0[name].shape[0] == 2  # each rank holds 2 of the 4 experts; the checkpoint holds all 4
    assert list(stored[f"model.{name}"].size) == list(stored[f"optim.state.{name}.exp_avg"].size) == \
        [4, *banks0[name].shape[1:]]

    model, optimizer = _load_at_ep1(ckpt, EP_CKPT)  # ep=1, one process: the whole bank in one tensor
    params = dict(model.named_parameters())
    for key in banks0:
        weight, _, moment = key.partition(".exp_")
        value = optimizer.state[params[weight]][f"exp_{moment}"] if moment else params[key].detach()
        assert torch.equal(value, torch.cat([banks0[key], banks1[key]])), key

    _roll_back_to(ckpt, 2)  # resume the ep=2 checkpoint at ep=1 in one process: DCP reshards model and AdamW
    at_ep1 = [(m["loss"], m["grad_norm"]) for m in train(load_config(EP_CKPT + [f"checkpoint.dir={ckpt}"]))]
    for (loss, norm), (ref_loss, ref_norm) in zip(at_ep1, straight[2:], strict=True):
        assert loss == pytest.approx(ref_loss, abs=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5)


def test_expert_parallel_groups_are_blocks_of_the_dp_groups():
    from curry_train.primitives import ParallelState

    ps = ParallelState(dp=4, pp=2, world_size=8, ep=2)  # no process group: the groups as rank lists
    assert ps.group_ranks("dp") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ps.ep_ranks() == [[0, 1], [2, 3], [4, 5], [6, 7]]  # consecutive dp ranks: one expert bank between them
    assert ps.expert_dp_ranks() == [[0, 2], [1, 3], [4, 6], [5, 7]]  # same ep coordinate: the same experts
    assert ps.ep_group is None and ps.ep_rank == 0
    with pytest.raises(ValueError, match="parallel.ep=3 must divide the data-parallel size 4"):
        ParallelState(dp=4, pp=2, world_size=8, ep=3)


@pytest.mark.parametrize("world_size,overrides,message", [
    (2, ["parallel.ep=3"], "parallel.ep=3 must divide the data-parallel size 2"),
    (4, ["parallel.ep=4", "model.moe_experts=6"], "parallel.ep=4 must divide model.moe_experts=6"),
    (4, ["parallel.ep=4", "parallel.dp=1", "parallel.cp=2", "parallel.pp=2", "parallel.n_microbatches=2"],
     "parallel.ep=4 must divide the data x context-parallel size dp * cp = 1 * 2 = 2"),
])
def test_bad_expert_parallel_is_one_line(world_size, overrides, message, capsys, no_launch, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    assert main(["train", *RUN, *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("overrides,message", [
    (["model.moe_top_k=5"], "model.moe_top_k must be"),
    (["model.moe_capacity_factor=0"], "model.moe_capacity_factor must be"),
    (["model.moe_experts=1"], "model.moe_experts must be"),
])
def test_bad_moe_settings_are_one_line(overrides, message, capsys, no_launch):
    assert main(["train", *RUN, *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def _copy_checkpoint(saved, step, *names):
    """``saved``'s ``step`` checkpoint copied alone into a folder of its own per name (beside ``saved``)."""
    from curry_train.primitives.checkpoint_layout import step_dirname

    for name in names:
        (saved.parent / name).mkdir()
        shutil.copytree(saved / step_dirname(step), saved.parent / name / step_dirname(step))
        (saved.parent / name / "latest").write_text(step_dirname(step))


EP_FSDP = ["parallel.ep=2", "parallel.sharding=full"]


def _ep_fsdp_save_and_resume(rank, ws, tmp):
    """ep 2 in dp 4, FSDP2 full: 4 steps saving at 2 and 4; then from the step-2 checkpoint at the same layout and
    at ep 1 under DDP (plain [E, ...] banks), each to step 4."""
    def run(*overrides):
        return [(m["step"], m["loss"], m["grad_norm"]) for m in train(load_config(EP_CKPT + list(overrides)))]

    straight = run(*EP_FSDP, f"checkpoint.dir={tmp / 'saved'}")
    torch.distributed.barrier()
    if rank == 0:
        _copy_checkpoint(tmp / "saved", 2, "same", "ep1", "one")
    torch.distributed.barrier()
    return straight, run(*EP_FSDP, f"checkpoint.dir={tmp / 'same'}"), run(f"checkpoint.dir={tmp / 'ep1'}")


@pytest.mark.timeout(400)
@pytest.mark.slow
def test_expert_parallel_fsdp2_checkpoints_cross_layouts(tmp_path):
    """ep 2 in dp 4 under FSDP2: each rank holds half of its 2-expert slice. The checkpoint stores every bank and its
    AdamW moments whole ([4, ...], each row written once) and resumes at the same layout, at ep 1 under DDP and in
    one process to the uninterrupted run's losses and grad norms."""
    from torch.distributed.checkpoint import FileSystemReader

    ranks = launch(_ep_fsdp_save_and_resume, 4, tmp_path, timeout=380)
    straight = ranks[0][0]
    assert all(r[0] == straight for r in ranks) and [s for s, *_ in straight] == [0, 1, 2, 3]
    stored = FileSystemReader(str(tmp_path / "saved" / "step-00000002")).read_metadata().state_dict_metadata
    name = next(k[len("model."):] for k in stored if k.endswith(".experts.w1"))
    assert list(stored[f"model.{name}"].size)[0] == list(stored[f"optim.state.{name}.exp_avg"].size)[0] == 4
    assert len(stored[f"model.{name}"].chunks) == 4  # one chunk of one expert per rank
    one = [(m["step"], m["loss"], m["grad_norm"]) for m in train(load_config(EP_CKPT + [
        f"checkpoint.dir={tmp_path / 'one'}"]))]
    for resumed in (*(r[1] for r in ranks), *(r[2] for r in ranks), one):
        assert [s for s, *_ in resumed] == [2, 3]
        for (_, loss, norm), (_, ref_loss, ref_norm) in zip(resumed, straight[2:], strict=True):
            assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5)
