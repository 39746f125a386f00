"""The config schema: one dataclass per group, a docstring per field (what it is, what is allowed).

Every key the package reads is declared here with its type and default; ``config.load_config`` composes
``conf/config.yaml`` on top of ``Config`` (registered in Hydra's ``ConfigStore`` as ``curry_train_schema``), and
each GPT preset ``conf/model/{tiny,small}.yaml`` extends ``ModelConfig`` (``model_schema/gpt``); the ``custom``
preset (the user's own model, ``model._target_=...``) is untyped: its keys are the factory's keyword arguments,
checked against its signature by ``user_model.check_model``. ``config.validate`` checks the values.
``python -m curry_train config`` prints every key with its docstring (``field_docs``).
"""

import ast
import inspect
import textwrap
from dataclasses import dataclass, field, is_dataclass
from functools import cache
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ..model import GPTConfig


@dataclass
class ModelConfig(GPTConfig):
    """``model.*``: the reference GPT's fields (``model.GPTConfig``, documented there) and the preset's name."""

    name: str = "tiny"
    """Preset name, printed in logs and bench output; ``model=tiny|small`` picks ``conf/model/NAME.yaml``."""
    init_from: Optional[str] = None
    """A Hugging Face GPT-2 folder (config.json + model.safetensors, e.g. from `export`) whose weights start the
    run (export_hf.py); its shape must equal model.*. null = random init. A resumed checkpoint wins over it."""


@dataclass
class DataConfig:
    """``data.*``: what to train on (``data.py``)."""

    path: Optional[str] = None
    """A text file, encoded by data.tokenizer in memory, with more than train.seq_len + 1 training tokens; null =
    the embedded corpus (this Python's stdlib source). For `prepare`: a file, folder or glob of text, JSON lines or
    Parquet."""
    tokenizer: str = "bytes"
    """bytes (token id = byte, vocab 256) | a local Hugging Face tokenizer.json or tokenizer folder (never
    downloaded; `python -m curry_train tokenizer` trains one). model.vocab_size must cover its ids."""
    prepared: Optional[str] = None
    """A folder written by `python -m curry_train prepare` (memmapped token shards, any size); replaces data.path.
    Its tokenizer must be data.tokenizer."""
    text_key: str = "text"
    """The text field of JSON-lines rows and the text column of Parquet files (`prepare`)."""
    max_bytes: int = 4_000_000
    """Size cap of the embedded corpus in bytes (= tokens), > 0."""
    val_fraction: float = 0.1
    """Tail of the tokens held out for validation, in [0, 1)."""
    variable_length: bool = False
    """Rows of random length in [min_len, train.seq_len], right-padded; padded targets are ignored by the loss."""
    min_len: int = 16
    """Shortest row when variable_length is true: >= 1 and <= train.seq_len."""


@dataclass
class SpikeConfig:
    """``train.spike.*``: roll back to the last good checkpoint on a sustained loss spike (``loop.SpikeRollback``)."""

    enabled: bool = False
    """On a sustained spike, load the newest checkpoint from before it and skip the spiking steps' data; needs
    checkpoint.dir and checkpoint.every > 0."""
    threshold_ratio: float = 5.0
    """A spike: loss - floor > threshold_ratio x (baseline - floor), baseline = median of the last window losses;
    > 1 (primitives/loss_spike.py)."""
    sustain_steps: int = 3
    """Spike steps in a row that trigger a rollback, > 0 (a single outlier is ignored when > 1)."""
    min_history: int = 20
    """Losses seen before a spike can count, >= 2."""
    window: int = 50
    """Recent non-spike losses the baseline (median) and floor (minimum) are taken over, >= 2."""
    floor: Optional[float] = None
    """The loss level the ratio is measured from; null = the window's minimum loss (scale-free)."""
    max_rollbacks: int = 3
    """Rollbacks in one run before a spike ends it with an error, >= 0 (0 = stop at the first spike)."""


@dataclass
class TrainConfig:
    """``train.*``: the loop, the optimizer and its schedule, recompute and compile (``train.py``, ``loop.py``)."""

    steps: int = 300
    """Optimizer steps, > 0."""
    batch_size: int = 16
    """Global batch in sequences per optimizer step (all ranks, all micro-batches), > 0: divisible by
    dp x gradient_accumulation_steps (x parallel.n_microbatches with pp > 1)."""
    seq_len: int = 128
    """Tokens per row, in [1, model.block_size]."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step on each rank, > 0 (1 = no accumulation)."""
    grad_accum_normalization: str = "tokens"
    """tokens (mean over every valid token of the global batch) | microbatches (classic mean of K micro-batch means)."""
    lr: float = 3.0e-3
    """Peak AdamW learning rate, > 0."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio at the last step; in [0, 1]."""
    warmup_steps: int = 10
    """Linear warmup steps, >= 0."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on biases or LayerNorm gains), >= 0."""
    beta1: float = 0.9
    """AdamW beta1, in [0, 1)."""
    beta2: float = 0.95
    """AdamW beta2, in [0, 1)."""
    grad_clip: float = 1.0
    """Max global gradient norm, >= 0; 0 disables clipping."""
    nonfinite_patience: int = 3
    """A step whose loss or gradient norm is NaN/Inf is skipped (no update; counted and logged); this many in a
    row end the run with an error, >= 1 (1 = stop at the first)."""
    log_every: int = 10
    """Print a log line every N steps (and after the last), >= 0; 0 = never."""
    progress: bool = True
    """tqdm progress bar on rank 0."""
    metrics_file: Optional[str] = None
    """Rank 0 appends one JSON line per optimizer step here; its folder must exist. null = no file."""
    eval_every: int = 0
    """Validation loss every N steps and after the last (evaluate.py), >= 0; 0 = never."""
    eval_batches: int = 4
    """Fixed held-out batches (train.batch_size rows each) the validation loss is the mean token loss of, > 0."""
    tensorboard_dir: Optional[str] = None
    """Rank 0 writes TensorBoard scalars here (loss, val_loss, lr, grad_norm, tokens_per_s); null = none."""
    recompute: Any = False
    """Activation checkpointing: false | true (= full) | full | selective."""
    recompute_every_n: int = 1
    """Recompute every n-th block, > 0 (1 = every block)."""
    compile: bool = False
    """torch.compile each block (after recompute, before sharding)."""
    loss: Any = None
    """null = cross-entropy on the model's logits over targets != -100 (model_io.forward_loss_sum); or your loss for a
    model whose forward is not (idx) -> logits: train.loss._target_=pkg.module.fn, fn(model, (x, y), **kwargs) ->
    (loss_sum, n_valid), each other train.loss.KEY=VALUE a keyword argument (user_model.py)."""
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    """Loss-spike watchdog and automatic rollback (off by default)."""


@dataclass
class ParallelConfig:
    """``parallel.*``: the rank grid (``ParallelState``), data-parallel sharding and the pipeline schedule."""

    dp: int = -1
    """Data-parallel size, > 0; -1 = what the world size leaves after pp * cp * tp. dp = dp_replicate * dp_shard."""
    dp_replicate: int = 1
    """HSDP: FSDP2 replicas of the sharded model (across nodes), > 0, dividing dp; > 1 needs sharding=full or
    shard_grad_op (fully_shard on the 2-D mesh dp_replicate x dp_shard: shard within, replicate across)."""
    dp_shard: int = -1
    """HSDP: ranks one FSDP2 replica is sharded over, > 0; -1 = dp / dp_replicate."""
    pp: int = 1
    """Pipeline stages (ranks), > 0; 1 = no pipeline."""
    tp: int = 1
    """Tensor-parallel size, > 0 (1 = off): block linears split over tp ranks (primitives/tensor_parallel.py); must
    divide the heads and widths; with dp > 1 needs sharding=full|shard_grad_op; with pp > 1 each stage's blocks
    are tensor-parallel."""
    cp: int = 1
    """Context-parallel size, >= 1: each rank keeps seq_len / cp tokens of every row and attention is ring attention
    over the cp group (primitives/context_parallel.py); train.seq_len divisible by 2 * cp, model.dropout = 0, and a
    model whose forward takes positions (the GPT) or position_ids (Hugging Face); with pp, the reference GPT."""
    ep: int = 1
    """Expert-parallel size, > 0 (1 = off): the experts of every MoE layer are sharded over ep ranks of the
    data-parallel group (x the cp group when cp > 1; per pipeline stage: the grid's sizes do not change); must
    divide dp * cp and model.moe_experts; sharding=no_shard (DDP, or plain pipeline stages) or full/shard_grad_op
    (FSDP2: each bank sharded over the ranks holding the same experts), not zero1; checkpoints hold whole banks."""
    sequence_parallel: bool = False
    """With tp > 1: norms and dropout run on seq_len / tp tokens per rank (reduce-scatter + all-gather instead of
    all-reduce); train.seq_len must be divisible by tp."""
    loss_parallel: bool = False
    """With tp > 1: logits stay split by vocabulary and the cross-entropy runs on the shards (untied head only:
    not the reference GPT, whose head is tied; not with train.loss)."""
    order: str = "pp-dp-cp-tp"
    """Rank-grid order, outermost first: pp, dp, cp and tp, each once, joined by '-'."""
    sharding: str = "no_shard"
    """no_shard (DDP) | zero1 | shard_grad_op (ZeRO-2) | full (ZeRO-3); all but no_shard need torchrun; with pp > 1
    full/shard_grad_op shard each stage (FSDP2), no_shard leaves stages plain, zero1 is refused."""
    mixed_precision: Optional[str] = None
    """null (fp32) | bf16; with pp > 1 bf16 needs sharding=full|shard_grad_op (FSDP2 stages)."""
    cpu_offload: bool = False
    """Offload FSDP2 parameters and optimizer state to CPU (shard_grad_op, full only)."""
    fsdp_prefetch: Optional[int] = None
    """FSDP2 explicit all-gather prefetch depth, 0..units-1: each unit prefetches the next N in forward and the
    previous N in backward (DistributedOptimizer.wrap prefetch). null = auto: 1 where there are >= 2 units."""
    fsdp_reshard_last: Optional[bool] = None
    """sharding=full: keep the last FSDP2 unit gathered from forward to backward (one all-gather saved per step).
    null = auto: on under full with >= 2 units, without pp (pp stages keep every unit gathered already)."""
    fsdp_blocks_per_unit: Optional[int] = None
    """Consecutive blocks per FSDP2 unit, 1..model.n_layer: fewer, bigger all-gathers and reduce-scatters.
    null = auto: 2 where there are >= 4 blocks. The three autos are bench sharding's fastest combination."""
    pp_schedule: str = "1f1b"
    """gpipe | 1f1b | interleaved | looped_bfs | zb | zbv | dualpipev (used when pp > 1)."""
    n_microbatches: int = 4
    """Pipeline micro-batches per step, > 0; 1f1b needs >= pp, dualpipev >= 2 * pp."""
    pp_stages_per_rank: Optional[int] = None
    """Stages per pipeline rank (gpipe, 1f1b: 1; interleaved, looped_bfs, zb: >= 2; zbv, dualpipev: 2);
    null = the schedule's default."""
    layers_per_stage: Optional[List[int]] = None
    """Blocks per pipeline stage, pp * stages-per-rank counts >= 0 summing to model.n_layer; null = an even split."""


@dataclass
class CheckpointConfig:
    """``checkpoint.*``: DCP checkpoints and resume (``train_state.py``, ``primitives/checkpoint.py``)."""

    dir: Optional[str] = None
    """Folder for checkpoints; a run resumes from its ``latest``. null = no checkpoints."""
    every: int = 0
    """Save every N steps and after the last step, >= 0 (0 = never; > 0 needs dir)."""
    keep_last: int = 2
    """Checkpoints kept (``latest`` and the newest before it), >= 0; 0 keeps every checkpoint."""
    async_save: bool = False
    """dcp.async_save: write in a background thread, committed when done or at exit."""
    thread_count: int = 1
    """DCP writer threads per rank (FileSystemWriter thread_count), >= 1; each writes its own file. 2 doubled
    the raw dcp.save MB/s of a 100M-param state on a quiet 2-core box (`bench checkpoint`)."""
    allow_unverified: bool = False
    """Load a checkpoint that has no integrity.json (one written before curry_train recorded it), unchecked and
    warned; false refuses it (a resume then falls back to an older checkpoint that verifies)."""
    on_disk_full: str = "stop"
    """A save that finds the disk full (its partial folder removed, committed checkpoints kept): stop (exit 1) |
    continue (train on without checkpoints)."""
    save_on_signal: bool = True
    """On SIGTERM (a preemption notice: SLURM, Kubernetes), finish the step, save, commit, exit 143; false: SIGTERM
    ends the run at once (the last committed checkpoint is kept). Needs dir; ignored without it."""


@dataclass
class BenchConfig:
    """``bench.*``: ``python -m curry_train bench`` (``bench/``)."""

    out_dir: str = "bench-results"
    """Each run writes a new folder OUT_DIR/<timestamp>/ with report.md, report.json and the PNGs."""
    burn_in: int = 3
    """Untimed steps per side before measuring, >= 0."""
    repeats: int = 10
    """Interleaved timing rounds (the side that goes first alternates), > 0."""
    steps_per_repeat: int = 5
    """Steps per side per round, > 0."""
    pipeline_batch_size: int = 64
    """Rows of the pipeline bench's global batch, > 0 and a multiple of its micro-batch count."""
    world_sizes: Optional[List[int]] = None
    """Rank counts of the sharding and pipeline benches, each >= 2; null = from the machine: powers of two from 2 up
    to the GPUs (nccl) or CPU cores (gloo), at most 8 GPUs or 4 CPU ranks (2 cores: [2]; 4: [2, 4])."""
    checkpoint_params: Optional[int] = None
    """Parameters of `bench checkpoint`'s large synthetic state (fp32 + AdamW, 12 B/param), >= 10000; null = the
    bench's own: 100M (5M with --quick). Refused up front if memory or disk is short."""


@dataclass
class Config:
    """The whole config: ``python -m curry_train config`` prints it."""

    model: Any = MISSING
    """The reference GPT of a preset (``model=tiny|small``, typed by its schema), or your own nn.Module:
    ``model._target_=pkg.module.factory``, each other ``model.KEY=VALUE`` a keyword argument of the factory
    (preset ``custom``, keys free; ``user_model.py``)."""
    seed: int = 1337
    """Seeds Python, numpy and torch (same initial weights on every rank) and the batch order; in [0, 2**32 - 1]."""
    device: str = "auto"
    """auto (CUDA if available, else CPU) | cpu | cuda."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


def register() -> None:
    """Put the schemas in Hydra's ``ConfigStore`` (idempotent): ``curry_train_schema`` and ``model_schema/gpt``."""
    store = ConfigStore.instance()
    store.store(name="curry_train_schema", node=Config)
    store.store(group="model_schema", name="gpt", node=ModelConfig)


@cache
def field_docs(schema: type) -> dict[str, str]:
    """Field name -> its docstring (the string right under the field), over ``schema`` and its dataclass bases."""
    docs = {}
    for klass in reversed(schema.__mro__):
        if not is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else None
            if isinstance(node, ast.AnnAssign) and isinstance(doc, str):
                docs[node.target.id] = " ".join(doc.split())
    return docs
