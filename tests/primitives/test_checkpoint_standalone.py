"""Checkpointer on a torchtitan-style decoder: a save/load round trip resumes bit-exactly (model, AdamW, LR
scheduler, RNG, step), the directory layout and pruning, a wrong model is refused before anything loads, a
damaged checkpoint is skipped, a NaN state is never saved, and an FSDP2 checkpoint written by 2 ranks loads
exactly at world size 2 and into one plain process."""

import copy
import json

import pytest
import torch
import torch.distributed as dist

from curry_train.primitives.checkpoint import CheckpointMismatchError, Checkpointer, step_dirname
from standalone_helpers import make_batch, spawn, tiny_decoder, token_loss

# torch.distributed.optim (ZeroRedundancyOptimizer) still uses torch.jit, which warns on import
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def _build(seed, **model_kw):
    model = tiny_decoder(seed=seed, **model_kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 4))
    return model, opt, sched


def _step(model, opt, sched, step, rank=0, world_size=1):
    """One AdamW step on this rank's rows of batch ``step``; returns the global mean token loss."""
    x, y = (t.chunk(world_size)[rank] for t in make_batch(rows=8, seed=step, padded=True))
    loss_sum, n = token_loss(model(x), y)
    stats = torch.stack([loss_sum.detach(), n.float()])
    if dist.is_initialized():
        dist.all_reduce(stats)
    (loss_sum / stats[1] * world_size).backward()  # data-parallel wrappers average: the gradient is sum / T
    opt.step()
    opt.zero_grad(set_to_none=True)
    if sched is not None:
        sched.step()
    return (stats[0] / stats[1]).item()


def _full_state(model, opt):
    """Unsharded model + optimizer state keyed by parameter name (rank 0 only under FSDP2), cloned."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return copy.deepcopy({"model": msd, "optim": osd.get("state", {})})  # "step" tensors alias the live state


def _max_diff(a, b) -> float:
    assert set(a["model"]) == set(b["model"]) and set(a["optim"]) == set(b["optim"])
    diffs = [(a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]]
    diffs += [(torch.as_tensor(v) - torch.as_tensor(b["optim"][fqn][name])).abs().max().item()
              for fqn, state in a["optim"].items() for name, v in state.items()]
    return max(diffs)


# -- one process ----------------------------------------------------------------------------------------------------

def test_round_trip_resumes_bit_exactly(tmp_path):
    """Save after 3 steps, load into a differently initialised model: same state, same RNG stream, and the next
    steps give the same losses, bit for bit."""
    model, opt, sched = _build(0)
    for s in range(3):
        _step(model, opt, sched, s)
    ckpt = Checkpointer(tmp_path / "ckpt")
    path = ckpt.save(3, model, opt, sched, extra={"data_position": 24})
    expected_rand = torch.rand(3)  # the RNG stream right after the save
    saved = _full_state(model, opt)

    other, other_opt, other_sched = _build(1)
    torch.manual_seed(999)
    meta = ckpt.load(other, other_opt, other_sched)
    assert meta["step"] == 3 and meta["extra"] == {"data_position": 24} and meta["rng_restored"]
    assert meta["path"] == str(path) and meta["world_size"] == 1
    assert torch.equal(torch.rand(3), expected_rand)
    assert _max_diff(saved, _full_state(other, other_opt)) == 0.0
    assert other_sched.state_dict() == sched.state_dict()
    assert [_step(model, opt, sched, s) for s in (3, 4)] == [_step(other, other_opt, other_sched, s) for s in (3, 4)]


def test_directory_layout_latest_pointer_and_pruning(tmp_path):
    """``step-%08d`` directories renamed into place, ``latest`` naming the newest, keep_last=2 pruning the rest."""
    assert step_dirname(10) == "step-00000010"
    model, opt, sched = _build(0)
    ckpt = Checkpointer(tmp_path, keep_last=2)
    assert ckpt.load(model, opt) is None and ckpt.latest_path() is None  # a fresh start
    for s in range(1, 5):
        ckpt.save(s, model, opt, sched)
        assert (tmp_path / "latest").read_text().strip() == step_dirname(s)
    assert ckpt.steps() == [3, 4] and ckpt.latest_path() == tmp_path / "step-00000004"
    ckpt.wait()  # pruned checkpoints are deleted on a thread; wait() (and the next save, and close()) joins it
    # the Checkpointer owns the folder while it is open (an advisory lock file); close() releases and removes it
    assert sorted(p.name for p in tmp_path.iterdir()) == [".curry-train.lock", "latest", "step-00000003", "step-00000004"]
    ckpt.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003", "step-00000004"]
    files = {p.name for p in (tmp_path / "step-00000004").iterdir()}
    assert {".metadata", "meta.json", "scheduler.pt", "rng-rank0.pt"} <= files
    assert any(f.endswith(".distcp") for f in files)
    assert json.loads((tmp_path / "step-00000004" / "meta.json").read_text())["step"] == 4


def test_wrong_model_is_refused_before_anything_loads(tmp_path):
    """A wider, deeper model: CheckpointMismatchError lists the shape mismatch and the missing keys; the model's
    weights are untouched."""
    model, opt, _ = _build(0)
    Checkpointer(tmp_path).save(1, model, opt)
    other = tiny_decoder(dim=48, n_layers=3)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(CheckpointMismatchError) as e:
        Checkpointer(tmp_path).load(other)
    msg = str(e.value)
    assert "tok_embeddings.weight: checkpoint [64, 32] vs model [64, 48]" in msg
    assert "missing from the checkpoint" in msg and "layers.2." in msg and "nothing was loaded" in msg
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    """Bytes flipped in step 2's data file: load() warns, names it in ``skipped`` and resumes from step 1."""
    model, opt, _ = _build(0)
    ckpt = Checkpointer(tmp_path, keep_last=0)
    ckpt.save(1, model, opt)
    at_step_1 = _full_state(model, opt)
    _step(model, opt, None, 1)
    ckpt.save(2, model, opt)
    data = next((tmp_path / step_dirname(2)).glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    fresh, fresh_opt, _ = _build(5)
    with pytest.warns(UserWarning, match="damaged"):
        meta = Checkpointer(tmp_path).load(fresh, fresh_opt)
    assert meta["step"] == 1 and [name for name, _ in meta["skipped"]] == [step_dirname(2)]
    assert _max_diff(at_step_1, _full_state(fresh, fresh_opt)) == 0.0


def test_nan_state_is_never_saved(tmp_path):
    """A NaN weight: save() refuses naming the tensor, writes nothing, and ``latest`` stays on the last good step."""
    model, opt, _ = _build(0)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, model, opt)
    with torch.no_grad():
        model.layers["1"].attention.wq.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"not saving step 2: .*layers\.1\.attention\.wq\.weight holds NaN or Inf"):
        ckpt.save(2, model, opt)  # NonFiniteStateError
    assert ckpt.steps() == [1] and (tmp_path / "latest").read_text().strip() == step_dirname(1)


@pytest.mark.filterwarnings("ignore:checkpoint .* is damaged")
def test_bad_arguments(tmp_path):
    """Bad settings fail at construction; a checkpoint without optimizer state, or a path that is not a checkpoint,
    fails at load."""
    model, opt, _ = _build(0)
    with pytest.raises(ValueError, match="checkpoint.dir must be a directory path"):
        Checkpointer(None)
    with pytest.raises(ValueError, match=r"checkpoint.keep_last must be an integer >= 0 .*got -1"):
        Checkpointer(tmp_path, keep_last=-1)
    with pytest.raises(ValueError, match="checkpoint.async_save must be true or false, got 'yes'"):
        Checkpointer(tmp_path, async_save="yes")
    with pytest.raises(ValueError, match="step must be a non-negative integer, got -1"):
        Checkpointer(tmp_path).save(-1, model)
    Checkpointer(tmp_path).save(1, model)  # model only
    with pytest.raises(ValueError, match="holds no optimizer state; load it with optimizer=None"):
        Checkpointer(tmp_path).load(model, opt)
    with pytest.raises(ValueError, match="nowhere: .metadata is missing"):  # CheckpointDamagedError
        Checkpointer(tmp_path).load(model, path=tmp_path / "nowhere")


# -- two ranks, FSDP2 -----------------------------------------------------------------------------------------------

def _fsdp2(seed):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_decoder(seed=seed)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))  # explicit: gloo on CPU even where CUDA is available
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _save_and_load_sharded(rank, world_size, root):
    model, opt = _fsdp2(0)
    for s in range(2):
        _step(model, opt, None, s, rank, world_size)
    Checkpointer(root).save(2, model, opt)
    saved = _full_state(model, opt)
    continued = [_step(model, opt, None, s, rank, world_size) for s in (2, 3)]

    fresh, fresh_opt = _fsdp2(123)  # different init: everything must come from the checkpoint
    meta = Checkpointer(root).load(fresh, fresh_opt)
    loaded = _full_state(fresh, fresh_opt)
    return {"saved": saved if rank == 0 else None, "diff": _max_diff(saved, loaded) if rank == 0 else None,
            "meta": meta, "local_rows": fresh.tok_embeddings.weight.to_local().shape[0], "continued": continued,
            "resumed": [_step(fresh, fresh_opt, None, s, rank, world_size) for s in (2, 3)]}


@pytest.mark.timeout(300)
def test_fsdp2_checkpoint_loads_exactly_at_world_size_2_and_in_one_process(tmp_path):
    """2 FSDP2 ranks save sharded DTensors; fresh ranks load them bit-exactly and continue with the same losses;
    one plain process (no process group) loads the same checkpoint into the unwrapped model exactly."""
    results = spawn(_save_and_load_sharded, 2, tmp_path / "ckpt", timeout=180)
    r0 = results[0]
    assert [r["local_rows"] for r in results] == [32, 32]  # 64-row embedding, one half per rank
    assert r0["diff"] == 0.0
    assert all(r["meta"]["step"] == 2 and r["meta"]["rng_restored"] for r in results)
    assert all(r["resumed"] == r["continued"] for r in results)

    model = tiny_decoder(seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    meta = Checkpointer(tmp_path / "ckpt").load(model, opt)
    assert meta["world_size"] == 2 and not meta["rng_restored"] and "RNG states skipped" in meta["rng_note"]
    assert _max_diff(r0["saved"], _full_state(model, opt)) == 0.0
