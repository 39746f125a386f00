"""Tensor (+ sequence, + loss) parallelism end to end: the reference GPT, a tiny Hugging Face Llama and the
torchtitan-like model give the single-process logits and gradients at tp 2 and 4; ``train`` at tp 2 (spawned and
through the real CLI under torchrun) and at dp 2 x tp 2 (FSDP2 on the 2-D mesh) gives the single-process losses; a
checkpoint saved at tp 2 loads at tp 1 with equal parameters; bad input is one line before any process group.

Few launches, many checks each: one spawned launch at world size 2, one at 4, one torchrun.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import curry_train
import foreign_models
from curry_train.config import load_config
from curry_train.distributed import free_port, launch
from curry_train.model import GPT, GPTConfig, token_loss
from curry_train.primitives.tensor_parallel import (apply_tensor_parallel, local_value, loss_parallel_context,
                                                    norm_saved_bytes)
from curry_train.train import train

TOL = 1e-5
RUN = ["model.n_layer=2", "model.n_embd=32", "model.n_head=4", "train.seq_len=32", "train.batch_size=4",
       "train.steps=3", "train.grad_clip=0.5", "train.progress=false", "train.log_every=0", "data.max_bytes=50000"]
LLAMA = ["model._target_=foreign_models.tiny_llama", "model.n_kv_head=4"]
TITAN = ["model._target_=foreign_models.titan_like"]
PACKAGE_ROOT = str(Path(curry_train.__file__).resolve().parents[1])


def _model(name: str):
    if name == "gpt":
        torch.manual_seed(0)
        return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32))
    if name == "llama":
        return foreign_models.tiny_llama(n_layer=2, n_embd=64, n_head=4, n_kv_head=4)
    return foreign_models.titan_like(n_layer=2, n_embd=64, n_head=4)


def _logits_and_grads(model, batch, loss_parallel=False):
    model.zero_grad(set_to_none=True)
    with loss_parallel_context(loss_parallel):
        out = model(batch[0])
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss_sum, n = token_loss(logits, batch[1])
        (loss_sum / n).backward()
    return local_value(logits).detach(), {k: local_value(p.grad).detach() for k, p in model.named_parameters()}


def _parity(tp_mesh, variants) -> dict:
    """Max abs differences of logits and every gradient against the unsharded model, per (model, sp, lp)."""
    g = torch.Generator().manual_seed(3)
    batch = (torch.randint(0, 256, (2, 32), generator=g), torch.randint(0, 256, (2, 32), generator=g))
    out = {}
    for name in ("gpt", "llama", "titan"):
        ref_logits, ref_grads = _logits_and_grads(_model(name), batch)
        for sp, lp in variants:
            if lp and name == "gpt":
                continue  # tied head: refused (tested below)
            model = apply_tensor_parallel(_model(name), tp_mesh, sp, lp)
            logits, grads = _logits_and_grads(model, batch, lp)
            out[f"{name} sp={sp} lp={lp}"] = ((logits - ref_logits).abs().max().item(),
                                               max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads))
    return out


def _norm_bytes(tp_mesh) -> dict:
    """Bytes saved for backward inside the norms, per rank, with and without sequence parallelism."""
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(4))
    out = {}
    for name in ("gpt", "llama", "titan"):
        for sp in (False, True):
            model = apply_tensor_parallel(_model(name), tp_mesh, sp)
            out[(name, sp)] = norm_saved_bytes(model, lambda: model(x))
    return out


def _losses(overrides) -> list[float]:
    """Per step: the loss and the gradient norm (clipped to 0.5: a wrong norm would change every later loss)."""
    return [v for m in train(load_config(RUN + overrides)) for v in (m["loss"], m["grad_norm"])]


def _world2(rank, ws, ckpt_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from curry_train.primitives.checkpoint import Checkpointer

    mesh = init_device_mesh("cpu", (2,))
    out = {"parity": _parity(mesh, [(False, False), (True, False), (False, True), (True, True)]),
           "norm_bytes": _norm_bytes(mesh)}
    out["train"] = {"gpt tp": _losses(["parallel.tp=2"]),
                    "llama tp sp lp": _losses(LLAMA + ["parallel.tp=2", "parallel.sequence_parallel=true",
                                                       "parallel.loss_parallel=true"]),
                    "titan tp sp recompute": _losses(TITAN + ["parallel.tp=2", "parallel.sequence_parallel=true",
                                                              "train.recompute=full"])}
    model = apply_tensor_parallel(_model("llama"), mesh, sequence_parallel=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _logits_and_grads(model, (torch.arange(64).view(2, 32), torch.arange(1, 65).view(2, 32)))
    optimizer.step()
    Checkpointer(ckpt_dir).save(1, model, optimizer)
    out["saved"] = {k: local_value(v).detach() for k, v in model.state_dict().items()}
    out["sharded"] = sorted(k for k, p in model.named_parameters() if isinstance(p, DTensor) and
                            p.placements[0].is_shard())
    return out


def _world4(rank, ws):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (4,))
    out = {"parity": _parity(mesh, [(False, False), (True, True)]), "norm_bytes": _norm_bytes(mesh)}
    out["train"] = {"dp2 tp2 full sp": _losses(["parallel.tp=2", "parallel.sharding=full",
                                                "parallel.sequence_parallel=true", "train.recompute=full"]),
                    "dp2 tp2 shard_grad_op": _losses(["parallel.tp=2", "parallel.sharding=shard_grad_op"])}
    return out


def _report(rank0: dict, references: dict, reference_of: dict) -> None:
    """The measured differences (pytest -s shows them)."""
    for key, (logits, grads) in rank0["parity"].items():
        print(f"parity {key}: logits {logits:.1e}, gradients {grads:.1e}")
    for key, ref in reference_of.items():
        diff = max(abs(a - b) for a, b in zip(rank0["train"][key], references[ref]))
        print(f"train {key}: loss and grad norm vs one process {diff:.1e}")


@pytest.fixture(scope="module")
def references():
    return {"gpt": _losses([]), "llama": _losses(LLAMA), "titan": _losses(TITAN)}


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_tp2_parity_training_and_checkpoint_resharding(tmp_path, references):
    ranks = launch(_world2, 2, str(tmp_path / "ckpt"), timeout=280)
    _report(ranks[0], references, {"gpt tp": "gpt", "llama tp sp lp": "llama", "titan tp sp recompute": "titan"})
    for r in ranks:
        assert len(r["parity"]) == 10, r["parity"]
        for key, (logits, grads) in r["parity"].items():
            assert logits <= TOL and grads <= TOL, (key, logits, grads)
        for key, reference in (("gpt tp", "gpt"), ("llama tp sp lp", "llama"), ("titan tp sp recompute", "titan")):
            assert r["train"][key] == pytest.approx(references[reference], abs=TOL), (key, r["train"][key])
    _assert_sp_divides_norm_bytes(ranks, 2)
    # what the plan shards: column/row linears of both blocks, the embedding and the head (by vocabulary)
    assert len(ranks[0]["sharded"]) == 2 * 7 + 2 and "model.layers.1.mlp.down_proj.weight" in ranks[0]["sharded"]

    from curry_train.primitives.checkpoint import Checkpointer

    plain = foreign_models.tiny_llama(n_layer=2, n_embd=64, n_head=4, n_kv_head=4, seed=7)  # other weights
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    meta = Checkpointer(tmp_path / "ckpt").load(plain, optimizer)
    assert meta["step"] == 1
    saved = ranks[0]["saved"]
    loaded = plain.state_dict()
    assert set(saved) == set(loaded)
    assert max((saved[k] - loaded[k]).abs().max().item() for k in saved) == 0.0
    assert all(torch.is_tensor(s["exp_avg"]) and not hasattr(s["exp_avg"], "full_tensor")
               for s in optimizer.state.values())


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_tp4_parity_and_dp2_x_tp2_fsdp2(references):
    ranks = launch(_world4, 4, timeout=280)
    _report(ranks[0], references, {key: "gpt" for key in ranks[0]["train"]})
    for r in ranks:
        assert len(r["parity"]) == 5, r["parity"]
        for key, (logits, grads) in r["parity"].items():
            assert logits <= TOL and grads <= TOL, (key, logits, grads)
        for key, losses in r["train"].items():
            assert losses == pytest.approx(references["gpt"], abs=TOL), (key, losses)
    _assert_sp_divides_norm_bytes(ranks, 4)


def _assert_sp_divides_norm_bytes(ranks, tp):
    """Sequence parallelism: every rank saves exactly 1/tp of the norms' activations (inputs, mean/rstd...)."""
    for r in ranks:
        for name in ("gpt", "llama", "titan"):
            full, sp = r["norm_bytes"][(name, False)], r["norm_bytes"][(name, True)]
            assert full > 0 and sp * tp == full, (name, tp, full, sp)
    print(f"tp={tp}: norm activation bytes per rank without / with SP:",
          {k: v for k, v in ranks[0]["norm_bytes"].items()})


@pytest.mark.timeout(200)
@pytest.mark.slow
def test_cli_torchrun_tp2_sequence_parallel_trains_like_one_process(tmp_path, references):
    """`torchrun --nproc-per-node 2 -m curry_train train parallel.tp=2 parallel.sequence_parallel=true`."""
    metrics = tmp_path / "metrics.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend",
           "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "curry_train", "train", *RUN,
           "parallel.tp=2", "parallel.sequence_parallel=true", f"train.metrics_file={metrics}", "train.log_every=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env["PYTHONPATH"] = PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun timed out:\n{out[-4000:]}") from None
    assert proc.returncode == 0, out[-6000:]
    assert "(dp 1, tp 2 + sequence parallel)" in out and "tp groups: [[0, 1]]" in out
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [v for m in lines for v in (m["loss"], m["grad_norm"])] == pytest.approx(references["gpt"], abs=TOL)


@pytest.mark.parametrize("overrides,world_size,message", [
    (["parallel.tp=4", "model.n_head=6", "model.n_embd=48"], 4,
     "parallel.tp=4 must divide the attention heads: GPT has 6 (model.n_head); each rank runs whole heads"),
    (LLAMA[:1] + ["parallel.tp=4"], 4,
     "parallel.tp=4 must divide the key/value heads: LlamaForCausalLM has 2 (config.num_key_value_heads)"),
    (["model._target_=foreign_models.tiny_gpt2", "parallel.tp=2"], 2,
     "parallel.tp=2: GPT2LMHeadModel: transformer.h.0.attn.c_attn is a fused [q; k; v] projection"),
    (["parallel.tp=2", "parallel.sharding=no_shard"], 4,
     "parallel.sharding=no_shard with parallel.tp=2 and dp=2: DDP and ZeRO-1 do not take tensor-parallel"),
    (["parallel.tp=2", "parallel.sharding=zero1"], 2, "parallel.sharding=zero1 with parallel.tp=2 and dp=1"),
    (["parallel.tp=2", "parallel.pp=2", "model.n_layer=3"], 4, "model.n_layer=3 is not divisible by the number of "
     "pipeline stages 2"),
    (["parallel.tp=4", "parallel.sequence_parallel=true", "train.seq_len=30"], 4,
     "train.seq_len=30 must be divisible by 4"),
    (["parallel.tp=2", "parallel.loss_parallel=true"], 2,
     "parallel.loss_parallel=true needs an untied, vocabulary-sharded head; GPT's head shares its weight with tok_emb"),
    (["parallel.tp=2", "model.dropout=0.1"], 2, "parallel.tp=2 with model.dropout=0.1 > 0"),
])
def test_bad_input_is_one_line_before_any_process_group(overrides, world_size, message, monkeypatch, no_launch):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(ValueError) as error:
        train(load_config(overrides))
    assert message in str(error.value) and len(str(error.value).splitlines()) == 1, str(error.value)
    assert not torch.distributed.is_initialized()
