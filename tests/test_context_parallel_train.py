"""Context parallelism in training: ``parallel.cp=2`` (ring attention, each rank N/2 tokens of every row) gives the
single-process losses and gradient norms for the reference GPT and a tiny Hugging Face Llama (RoPE at the global
positions); dp 2 x cp 2 with FSDP2 and recompute at world size 4 too; bad input is one line before any process group.

Two launches (world size 2 and 4), many checks each. Ring attention itself is tested against full SDPA in
tests/primitives/test_context_parallel_standalone.py."""

import pytest
import torch

from curry_train.config import load_config
from curry_train.distributed import launch
from curry_train.train import train

TOL = 1e-5
RUN = ["model.n_layer=2", "model.n_embd=32", "model.n_head=4", "train.seq_len=32", "train.batch_size=4",
       "train.steps=3", "train.grad_clip=0.5", "train.progress=false", "train.log_every=0", "data.max_bytes=50000"]
LLAMA = ["model._target_=foreign_models.tiny_llama", "model.n_kv_head=2"]


def _losses(overrides) -> list[float]:
    """Per step: the loss and the gradient norm (clipped to 0.5: a wrong norm would change every later loss)."""
    return [v for m in train(load_config(RUN + overrides)) for v in (m["loss"], m["grad_norm"])]


def _spy_ring(seen: list):
    """Record the local query length of every ring-attention call: proof that attention really ran sharded."""
    import curry_train.primitives.context_parallel as cp

    ring = cp.ring_attention

    def spy(q, *args, **kwargs):
        seen.append(q.shape[-2])
        return ring(q, *args, **kwargs)

    cp.ring_attention = spy


def _world2(rank, ws):
    seen = []
    _spy_ring(seen)
    out = {"gpt": _losses(["parallel.cp=2"]), "llama": _losses(LLAMA + ["parallel.cp=2"]),
           "gpt recompute": _losses(["parallel.cp=2", "train.recompute=full", "train.gradient_accumulation_steps=2"])}
    out["ring calls"], out["local lengths"] = len(seen), sorted(set(seen))
    return out


def _world4(rank, ws):
    return {"dp2 cp2 full": _losses(["parallel.cp=2", "parallel.sharding=full", "train.recompute=selective"]),
            "dp2 cp2 ddp": _losses(["parallel.cp=2"])}


@pytest.fixture(scope="module")
def references():
    return {"gpt": _losses([]), "llama": _losses(LLAMA),
            "gpt ga2": _losses(["train.gradient_accumulation_steps=2"])}


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_cp2_trains_like_one_process(references):
    rank0, rank1 = launch(_world2, 2, timeout=280)
    assert rank0 == rank1  # every rank reports the same global loss and norm
    assert rank0["local lengths"] == [16] and rank0["ring calls"] >= 3 * 2 * 3  # N/cp tokens; steps x layers x runs
    assert rank0["gpt"] == pytest.approx(references["gpt"], abs=TOL)
    assert rank0["llama"] == pytest.approx(references["llama"], abs=TOL)
    assert rank0["gpt recompute"] == pytest.approx(references["gpt ga2"], abs=TOL)


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_dp2_x_cp2_fsdp2_trains_like_one_process(references):
    ranks = launch(_world4, 4, timeout=280)
    for key in ("dp2 cp2 full", "dp2 cp2 ddp"):
        assert ranks[0][key] == pytest.approx(references["gpt"], abs=TOL), key


@pytest.mark.parametrize("overrides,world_size,message", [
    (["parallel.cp=2", "train.seq_len=30"], 2, "train.seq_len=30 must be divisible by 4"),
    (["parallel.cp=2", "parallel.tp=4", "parallel.sequence_parallel=true", "train.seq_len=36"], 8,
     "each rank's train.seq_len / cp = 18 tokens must be divisible by parallel.tp=4"),
    (["parallel.cp=2", "model.dropout=0.1"], 2, "ring attention has no attention dropout"),
    (["parallel.cp=2", "model._target_=foreign_models.titan_like"], 2,
     "needs a model whose forward takes the global token positions"),
    (["parallel.cp=3"], 4, "world size 4 is not divisible by parallel.pp*cp*tp"),
])
def test_bad_input_is_one_line_before_any_process_group(overrides, world_size, message, monkeypatch, no_launch):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(ValueError) as error:
        train(load_config(RUN + overrides))
    assert message in str(error.value) and len(str(error.value).splitlines()) == 1, str(error.value)
    assert not torch.distributed.is_initialized()
