"""Checkpointer: exact resume, resharding 4 -> 2 -> 1 (FSDP2), atomic saves under injected crashes, async, pruning.

Multi-process parts run in spawned gloo ranks (``launch``); the pytest process itself never starts a group.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

import curry_train
from curry_train.distributed import launch
from curry_train.loop import build_optimizer, build_scheduler
from curry_train.model import GPT, GPTConfig, token_loss
from curry_train.primitives import Checkpointer
from curry_train.primitives.checkpoint import CheckpointMismatchError, NonFiniteStateError, step_dirname
from curry_train.primitives.checkpoint_trust import temp_run

PACKAGE_ROOT = str(Path(curry_train.__file__).resolve().parents[1])  # subprocesses import this copy
SMALL = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32)


def _build(seed, cfg=SMALL):
    torch.manual_seed(seed)
    model = GPT(cfg)
    opt = build_optimizer(model, 1e-2)
    return model, opt, build_scheduler(opt, 2, 20)


def _batch(step, rows=8, seq=32):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, 256, (rows, seq + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _step(model, opt, sched, step, rank=0, world=1):
    """One AdamW step on this rank's slice of a fixed global batch; returns the global mean token loss."""
    x, y = _batch(step)
    n = x.shape[0] // world
    loss_sum, count = token_loss(model(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n])
    opt.zero_grad(set_to_none=True)
    (loss_sum / count).backward()
    opt.step()
    sched.step()
    loss = (loss_sum / count).detach()
    if dist.is_initialized():
        dist.all_reduce(loss)
        loss /= world
    return loss.item()


def _full_state(model, opt):
    """Unsharded model + optimizer state, FQN-keyed (rank 0 only under FSDP2); cloned, never aliased."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return copy.deepcopy({"model": msd, "optim": osd})  # optimizer 'step' tensors alias the live state


def _max_diff(a, b) -> float:
    """Max |a - b| over two full states (model tensors and every optimizer state tensor), keys must agree."""
    assert set(a["model"]) == set(b["model"]), set(a["model"]) ^ set(b["model"])
    assert set(a["optim"]["state"]) == set(b["optim"]["state"])
    diffs = [(a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"]]
    for fqn, s in a["optim"]["state"].items():
        for name, v in s.items():
            diffs.append((torch.as_tensor(v).double() - torch.as_tensor(b["optim"]["state"][fqn][name]).double()).abs().max().item())
    return max(diffs)


# -- single process -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_roundtrip_restores_model_optimizer_scheduler_rng_and_strips_wrapper_prefixes(tmp_path):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from curry_train.model import Block

    model, opt, sched = _build(0)
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))  # adds _checkpoint_wrapped_module.
    for s in range(3):
        _step(model, opt, sched, s)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, model, opt, sched, extra={"data_position": 3})
    expected_rand = torch.rand(3)  # the RNG stream right after the save
    saved = _full_state(model, opt)

    plain, plain_opt, plain_sched = _build(1)  # different init, no wrapper
    torch.manual_seed(999)
    meta = ckpt.load(plain, plain_opt, plain_sched)
    assert meta["step"] == 3 and meta["extra"] == {"data_position": 3} and meta["rng_restored"]
    assert torch.equal(torch.rand(3), expected_rand)
    assert _max_diff(saved, _full_state(plain, plain_opt)) == 0.0
    assert plain_sched.state_dict() == sched.state_dict()
    assert plain.head.weight is plain.tok_emb.weight  # the tie survives the load
    keys = FileSystemReader(str(tmp_path / step_dirname(3))).read_metadata().state_dict_metadata
    assert "model.blocks.0.attn.qkv.weight" in keys and "optim.state.blocks.0.attn.qkv.weight.exp_avg" in keys
    assert "optim.param_groups.blocks.0.attn.qkv.weight.lr" in keys  # flattened: hyperparameters per FQN
    assert not [k for k in keys if "_checkpoint_wrapped_module" in k or "module." in k.split(".", 1)[0]]
    # continuing gives identical losses
    assert [_step(model, opt, sched, s) for s in (3, 4)] == [_step(plain, plain_opt, plain_sched, s) for s in (3, 4)]


def test_keep_last_prunes_oldest_and_latest_moves_after_each_save(tmp_path):
    model, opt, sched = _build(0)
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for s in range(1, 6):
        ckpt.save(s, model, opt, sched)
        assert (tmp_path / "latest").read_text().strip() == step_dirname(s)
    assert ckpt.steps() == [4, 5]  # pruned ones are out of sight at once (renamed), deleted on a thread
    ckpt.close()  # joins that thread and gives up the folder (its lock file goes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", step_dirname(4), step_dirname(5)]
    keep_all = Checkpointer(tmp_path / "all", keep_last=0)
    for s in range(1, 4):
        keep_all.save(s, model)
    assert keep_all.steps() == [1, 2, 3]
    # rollback: point latest at an older step; pruning keeps what comes after latest
    (tmp_path / "latest").write_text(step_dirname(4))
    ckpt.save(7, model, opt, sched)
    assert ckpt.steps() == [5, 7]


def test_crash_inside_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model, opt, sched = _build(0)
    ckpt = Checkpointer(tmp_path, keep_last=2)
    _step(model, opt, sched, 0)
    ckpt.save(1, model, opt, sched, extra={"data_position": 1})
    at_step_1 = _full_state(model, opt)
    _step(model, opt, sched, 1)

    original = FileSystemWriter.write_data

    def write_then_crash(self, plan, planner):
        result = original(self, plan, planner)
        result.wait()  # the first data file is on disk ...
        raise RuntimeError("injected crash after the first checkpoint file")  # ... then the process "dies"

    monkeypatch.setattr(FileSystemWriter, "write_data", write_then_crash)
    written = []
    monkeypatch.setattr(FileSystemWriter, "write_data", lambda self, plan, planner: (
        written.extend(Path(self.path).iterdir()), write_then_crash(self, plan, planner))[1])
    with pytest.raises(CheckpointException, match="injected crash"):
        ckpt.save(2, model, opt, sched, extra={"data_position": 2})
    tmp_dir = written[0].parent
    assert temp_run(tmp_dir.name) == ckpt.run and not tmp_dir.exists(), "the failed save removed its partial folder"
    assert not (tmp_path / step_dirname(2)).exists()
    assert (tmp_path / "latest").read_text().strip() == step_dirname(1)

    fresh, fresh_opt, fresh_sched = _build(5)
    meta = Checkpointer(tmp_path).load(fresh, fresh_opt, fresh_sched)
    assert meta["step"] == 1
    assert _max_diff(at_step_1, _full_state(fresh, fresh_opt)) == 0.0

    monkeypatch.setattr(FileSystemWriter, "write_data", original)
    ckpt.save(2, model, opt, sched)  # the next save succeeds
    assert ckpt.steps() == [1, 2] and not tmp_dir.exists()


KILL_INSIDE_SAVE = """
import os, signal, sys, torch
from torch.distributed.checkpoint import FileSystemWriter
from curry_train.model import GPT, GPTConfig
from curry_train.primitives import Checkpointer
torch.manual_seed(0)
model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32))
ckpt = Checkpointer(sys.argv[1])
ckpt.save(1, model)
original = FileSystemWriter.write_data
def write_then_die(self, plan, planner):
    original(self, plan, planner).wait()
    os.kill(os.getpid(), signal.SIGKILL)  # the process dies with the data file written, before .metadata
FileSystemWriter.write_data = write_then_die
with torch.no_grad():
    model.tok_emb.weight.add_(1.0)
ckpt.save(2, model)
"""


@pytest.mark.slow
def test_sigkill_inside_save_keeps_latest_on_the_previous_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", KILL_INSIDE_SAVE, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-3000:]
    left = [p for p in tmp_path.iterdir() if temp_run(p.name) is not None]  # marked with the dead run's id
    assert [p.name.rpartition("~")[2] for p in left] == [step_dirname(2)] and any(q.suffix == ".distcp" for q in left[0].iterdir())
    assert (tmp_path / "latest").read_text().strip() == step_dirname(1)
    torch.manual_seed(0)
    expected = GPT(SMALL)
    loaded = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32))
    torch.nn.init.zeros_(loaded.tok_emb.weight)
    assert Checkpointer(tmp_path).load(loaded)["step"] == 1
    assert torch.equal(loaded.tok_emb.weight, expected.tok_emb.weight)
    owner = Checkpointer(tmp_path)
    assert owner.acquire() == [left[0].name] and not left[0].exists()  # the next owner removes the dead run's save
    owner.close()


@pytest.mark.slow
def test_async_save_snapshots_state_and_commits_on_wait(tmp_path):
    model, opt, sched = _build(0)
    for s in range(2):
        _step(model, opt, sched, s)
    ckpt = Checkpointer(tmp_path, async_save=True)
    ckpt.save(2, model, opt, sched)
    snapshot = _full_state(model, opt)
    for s in range(2, 5):  # keep training while the save is written: must not leak into the checkpoint
        _step(model, opt, sched, s)
    ckpt.save(5, model, opt, sched)  # waits for (and commits) step 2 first
    ckpt.close()
    assert ckpt.steps() == [2, 5] and (tmp_path / "latest").read_text().strip() == step_dirname(5)
    fresh, fresh_opt, fresh_sched = _build(3)
    Checkpointer(tmp_path).load(fresh, fresh_opt, fresh_sched, path=tmp_path / step_dirname(2))
    assert _max_diff(snapshot, _full_state(fresh, fresh_opt)) == 0.0


def test_loading_a_different_model_shape_lists_the_mismatched_keys(tmp_path):
    model, opt, sched = _build(0)
    Checkpointer(tmp_path).save(1, model, opt, sched)
    other, other_opt, _ = _build(0, GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=32))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(CheckpointMismatchError) as e:
        Checkpointer(tmp_path).load(other, other_opt)
    msg = str(e.value)
    assert "tok_emb.weight: checkpoint [256, 64] vs model [256, 32]" in msg
    assert "missing from the checkpoint" in msg and "blocks.2." in msg
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items()), "nothing may be loaded"


def test_bad_checkpoint_config_fails_before_training(tmp_path, monkeypatch):
    from curry_train.config import load_config
    from curry_train.train import train

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    metrics = tmp_path / "metrics.jsonl"
    base = ["train.steps=2", "train.progress=false", f"train.metrics_file={metrics}"]
    cases = [
        ([f"checkpoint.dir={not_a_dir}/ckpt", "checkpoint.every=1"], "checkpoint.dir=.* is not writable"),
        (["checkpoint.every=3"], "checkpoint.every=3 needs checkpoint.dir"),
        ([f"checkpoint.dir={tmp_path}/c", "checkpoint.keep_last=-1"], "checkpoint.keep_last must be"),
        ([f"checkpoint.dir={tmp_path}/c", "checkpoint.every=-2"], "checkpoint.every must be"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            train(load_config(base + overrides))
    monkeypatch.setenv("CURRY_TRAIN_FAULT_AT_STEP", "soon")
    with pytest.raises(ValueError, match="CURRY_TRAIN_FAULT_AT_STEP"):
        train(load_config(base))
    assert not metrics.exists(), "no training step may run on bad input"


# -- exact resume through the CLI, in new processes -------------------------------------------------------

RUN = ["model.n_layer=2", "model.n_embd=64", "train.steps=20", "train.batch_size=8", "train.seq_len=32",
       "train.progress=false", "train.log_every=0", "train.warmup_steps=3"]


def _cli(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "curry_train", "train", *RUN, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _losses(path):
    return {m["step"]: m["loss"] for m in map(json.loads, Path(path).read_text().splitlines())}


@pytest.mark.slow
def test_resume_is_bitwise_exact_in_one_process(tmp_path):
    straight = tmp_path / "straight.jsonl"
    _cli([f"train.metrics_file={straight}"], tmp_path)
    saving = tmp_path / "saving.jsonl"
    _cli([f"train.metrics_file={saving}", f"checkpoint.dir={tmp_path}/a", "checkpoint.every=10"], tmp_path)
    assert _losses(saving) == _losses(straight), "saving checkpoints must not change training"
    # a new process that finds only the step-10 checkpoint resumes there and runs steps 10..19
    (tmp_path / "b").mkdir()
    os.rename(tmp_path / "a" / step_dirname(10), tmp_path / "b" / step_dirname(10))
    (tmp_path / "b" / "latest").write_text(step_dirname(10))
    resumed = tmp_path / "resumed.jsonl"
    out = _cli([f"train.metrics_file={resumed}", f"checkpoint.dir={tmp_path}/b", "checkpoint.every=10"], tmp_path)
    assert "resumed from" in out and "at step 10 (RNG restored)" in out
    after = _losses(resumed)
    assert sorted(after) == list(range(10, 20))
    assert after == {s: v for s, v in _losses(straight).items() if s >= 10}  # bitwise: == on floats


# -- resharding 4 -> 2 -> 1 with FSDP2 ------------------------------------------------------------------

def _fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _build_fsdp(seed):
    torch.manual_seed(seed)
    model = _fsdp2(GPT(SMALL))
    opt = build_optimizer(model, 1e-2)
    return model, opt, build_scheduler(opt, 2, 20)


def _save_ws4(rank, world, root):
    model, opt, sched = _build_fsdp(0)
    for s in range(3):
        _step(model, opt, sched, s, rank, world)
    Checkpointer(root / "ckpt").save(3, model, opt, sched, extra={"data_position": 3})
    full = _full_state(model, opt)
    shard_rows = model.tok_emb.weight.to_local().shape[0]
    continued = [_step(model, opt, sched, s, rank, world) for s in (3, 4)]
    if rank == 0:
        torch.save({"state": full, "continued": continued}, root / "reference.pt")
    return shard_rows


def _load_ws2(rank, world, root):
    ref = torch.load(root / "reference.pt", weights_only=True)
    model, opt, sched = _build_fsdp(123)  # different init: everything must come from the checkpoint
    meta = Checkpointer(root / "ckpt").load(model, opt, sched)
    full = _full_state(model, opt)
    diff = _max_diff(ref["state"], full) if rank == 0 else None
    out = {"diff": diff, "meta": meta, "shard_rows": model.tok_emb.weight.to_local().shape[0],
           "continued": [_step(model, opt, sched, s, rank, world) for s in (3, 4)]}
    # async save at ws 2 on the dedicated gloo group; keep training while it is written; reload it
    ckpt = Checkpointer(root / "async", async_save=True)
    ckpt.save(5, model, opt, sched)
    snapshot = _full_state(model, opt)
    _step(model, opt, sched, 5, rank, world)
    ckpt.close()  # rank 0 commits (renames into place); rank 1 returns at once
    other, other_opt, other_sched = _build_fsdp(7)
    reader = Checkpointer(root / "async")
    if rank == 1:  # what rank 1 saw when it listed the directory before rank 0's rename: nothing
        reader.candidates = lambda: []
    out["shared"] = [p.name for p in reader.shared_candidates()]
    out["loaded_step"] = reader.load(other, other_opt, other_sched)["step"]  # rank 0's list, on every rank
    again = _full_state(other, other_opt)
    out["async_diff"] = _max_diff(snapshot, again) if rank == 0 else None
    # one rank's shard turns Inf: the sync save writes, finds it while sealing, removes the files, raises everywhere
    guarded = Checkpointer(root / "nan")
    guarded.save(1, other, other_opt, other_sched)
    if rank == 1:
        with torch.no_grad():
            other.tok_emb.weight.to_local()[0, 0] = float("inf")
    try:
        guarded.save(2, other, other_opt, other_sched)
        out["nan"] = "saved"
    except NonFiniteStateError as e:
        out["nan"] = str(e)
    out["nan_left"] = sorted(p.name for p in (root / "nan").iterdir())
    return out


@pytest.mark.slow
def test_reshard_fsdp2_4_to_2_to_1_is_exact(tmp_path):
    rows4 = launch(_save_ws4, 4, tmp_path, timeout=300)
    assert rows4 == [64] * 4  # 256-row embedding in 4 shards
    ref = torch.load(tmp_path / "reference.pt", weights_only=True)
    two = launch(_load_ws2, 2, tmp_path, timeout=300)
    assert [r["shard_rows"] for r in two] == [128, 128]
    assert two[0]["diff"] == 0.0, "params and AdamW state must be bit-identical after resharding 4 -> 2"
    assert two[0]["meta"]["world_size"] == 4 and not two[0]["meta"]["rng_restored"]
    assert "RNG states skipped" in two[0]["meta"]["rng_note"]
    for got, want in zip(two[0]["continued"], ref["continued"]):
        assert abs(got - want) <= 1e-6
    assert two[0]["async_diff"] == 0.0
    assert [r["shared"] for r in two] == [["step-00000005"]] * 2 and [r["loaded_step"] for r in two] == [5, 5]
    for r in two:
        assert r["nan"].startswith("not saving step 2: model.tok_emb.weight (rank 1) holds NaN or Inf")
        # no temporary left (rank 0's lock file goes when its guarded is collected, maybe before rank 1 looks)
        assert [n for n in r["nan_left"] if n != ".curry-train.lock"] == ["latest", "step-00000001"]

    # world size 1, no process group, plain GPT (no FSDP): keys carry no wrapper prefixes
    plain, opt, sched = _build(42)
    meta = Checkpointer(tmp_path / "ckpt").load(plain, opt, sched)
    assert meta["step"] == 3
    assert _max_diff(ref["state"], _full_state(plain, opt)) == 0.0
    continued = [_step(plain, opt, sched, s) for s in (3, 4)]
    for got, want in zip(continued, ref["continued"]):
        assert abs(got - want) <= 1e-6


# -- the numbers behind skills/stage5-checkpoint-cadence ------------------------------------------------

def test_young_daly_interval_minimises_the_expected_waste():
    from curry_train.bench.checkpoint import expected_waste, young_daly_interval

    save, mtbf, restart = 30.0, 24 * 3600.0, 60.0
    best = young_daly_interval(save, mtbf)
    assert best == pytest.approx((2 * save * mtbf) ** 0.5) and best == pytest.approx(2276.8, abs=0.1)
    grid = [best * f for f in (0.5, 0.8, 0.95, 1.05, 1.25, 2.0)]
    assert all(expected_waste(best, save, mtbf, restart) < expected_waste(t, save, mtbf, restart) for t in grid)
    assert expected_waste(best, save, mtbf, restart) == pytest.approx((2 * save / mtbf) ** 0.5 + restart / mtbf)
    with pytest.raises(ValueError, match="must be > 0"):
        young_daly_interval(0.0, mtbf)


@pytest.mark.slow
def test_checkpoint_bench_measures_size_and_times_on_the_reference_gpt():
    from curry_train.bench.checkpoint import ADAMW_FP32_BYTES_PER_PARAM, bench_checkpoint
    from curry_train.config import load_config

    cfg = load_config(["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "bench.repeats=2",
                       "bench.checkpoint_params=20000"])  # the large synthetic state, kept tiny here
    r = bench_checkpoint(cfg)
    assert r["params"] == GPT(GPTConfig.from_config(cfg.model)).n_params()
    # weights + exp_avg + exp_avg_sq in fp32, plus a fixed cost per entry (tensors, flattened hyperparameters)
    assert ADAMW_FP32_BYTES_PER_PARAM * r["params"] < r["data_bytes"] < r["bytes"]
    assert 100 < r["overhead_bytes_per_entry"] < 4096 and r["entries"] > 3 * 2 * 12  # 2 blocks x 12 tensors x 3
    assert r["save_s"] > 0 and r["load_s"] > 0 and 0 < r["async_blocking_s"] <= r["async_total_s"]
    assert [row["mtbf_h"] for row in r["young_daly"]] == [1.0, 24.0]
    assert r["young_daly"][0]["interval_s"] == pytest.approx((2 * r["save_s"] * 3600) ** 0.5)
    large = r["large"]  # bench.checkpoint_params is applied; Young/Daly fed by the large state's own save time
    assert 20_000 <= large["params"] < 100_000 and large["load_exact"] is True
    assert large["young_daly"][1]["interval_s"] == pytest.approx((2 * large["save_s"] * 24 * 3600) ** 0.5)


def test_save_drops_the_previous_checkpoints_page_cache_and_keeps_its_bytes(tmp_path, monkeypatch):
    """Before writing step N, the checkpoint ``latest`` names is dropped from the page cache (clean pages only: its
    files stay intact and load bit-exactly); the first save has nothing to drop."""
    import curry_train.primitives.checkpoint as checkpoint_module
    from curry_train.primitives.checkpoint_files import drop_page_cache, verify

    dropped = []
    monkeypatch.setattr(checkpoint_module, "drop_page_cache", lambda path: dropped.append(Path(path).name) or True)
    model, opt, sched = _build(0)
    ckpt = Checkpointer(tmp_path, keep_last=2)
    ckpt.save(1, model, opt, sched)
    assert dropped == []
    ckpt.save(2, model, opt, sched)
    assert dropped == [step_dirname(1)]
    assert drop_page_cache(tmp_path / step_dirname(2)) in (True, False)  # the real call, on every file of a folder
    assert verify(tmp_path / step_dirname(2)) is None
    fresh, fresh_opt, fresh_sched = _build(1)
    ckpt.load(fresh, fresh_opt, fresh_sched)
    assert _max_diff(_full_state(fresh, fresh_opt), _full_state(model, opt)) == 0
