"""Data-parallel state sharding (ZeRO 1/2/3) on PyTorch: DDP, ``ZeroRedundancyOptimizer`` and FSDP2.

Per-rank bytes for ``Psi`` parameters trained with Adam over ``N`` data-parallel ranks (ZeRO paper, Rajbhandari
et al. 2019). fp32 training holds params 4 Psi + grads 4 Psi + Adam moments 8 Psi = 16 Psi; mixed precision
holds half-precision params 2 Psi + grads 2 Psi + fp32 master copy, moments 12 Psi = 16 Psi. Sharding divides:

=================  =========================  ======================  ============================
``sharding``       built on                   divides by N            per rank (mixed precision)
=================  =========================  ======================  ============================
``no_shard``       DDP                        nothing                 16 Psi
``zero1``          DDP + ZeroRedundancyOpt.   optimizer state         4 Psi + 12 Psi / N
``shard_grad_op``  FSDP2, no reshard after    grads + optimizer,      2 Psi + 14 Psi / N
                   forward                    params between steps
``full``           FSDP2 (ZeRO-3)             everything              16 Psi / N
=================  =========================  ======================  ============================

FSDP2's ``shard_grad_op`` is not DeepSpeed's ZeRO-2: parameters are sharded at rest too; the whole parameter
set is gathered in forward and kept until backward (``reshard_after_forward=False``), which saves the second
all-gather. Between steps it holds ``16 Psi / N``; from forward to backward ``Psi`` more unsharded params.

``DistributedOptimizer.wrap(model, sharding=...)`` shards every transformer block, then the root, and builds the
optimizer for the wrapped model. Blocks come from ``primitives.blocks.find_blocks`` (the reference GPT, Hugging
Face ``model.layers`` / ``transformer.h``, torchtitan's ``layers`` ``nn.ModuleDict``, or ``block_types=``); an
FSDP2 mode on a model where none is found raises ``NoBlocksError`` naming the model class and ``block_types``,
before any collective, instead of sharding the whole model as one unit (one all-gather of every parameter).
FSDP2 keeps averaging gradients over the group (like DDP), which ``GradientAccumulation``'s ``T / N`` loss
divisor relies on. ``memory_report()`` counts the bytes each rank really holds (``DTensor.to_local()``).

FSDP1-style arguments: ``use_orig_params=True`` is what FSDP2 always does (``False`` is rejected);
``backward_prefetch="backward_pre"`` is FSDP2's built-in behaviour (other values are rejected: use
``prefetch=k``, i.e. ``FSDPModule.set_modules_to_backward_prefetch``); FSDP1 strategy names ``FULL_SHARD``/
``SHARD_GRAD_OP``/``NO_SHARD`` and ``zero2``/``zero3`` map to the modes above; ``fp16`` is rejected (it needs a
gradient scaler). Step-time levers of the FSDP2 modes (``prefetch``, ``reshard_last``, ``blocks_per_unit``,
``reduce_dtype``): ``wrap``'s docstring; ``python -m curry_train bench sharding`` measures each against DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ._config import config_getter
from .blocks import NoBlocksError, find_blocks, require_blocks
from .fsdp_levers import FSDP_MODES, check_lever_limits, check_levers, fully_shard_blocks, resolve_levers
from .zero1 import state_bytes, zero1_optimizer

SHARDINGS = ("no_shard", "zero1", "shard_grad_op", "full")
ALIASES = {"ddp": "no_shard", "zero1": "zero1", "zero2": "shard_grad_op", "zero3": "full", "fsdp": "full",
           "full_shard": "full", "no_shard": "no_shard", "shard_grad_op": "shard_grad_op", "full": "full"}
PRECISIONS = (None, "fp32", "bf16")

# bytes per parameter: (params, grads, optimizer state) for Adam; see the module docstring.
BYTES_PER_PARAM = {"fp32": (4, 4, 8), "mixed": (2, 2, 12)}
DIVIDED = {"no_shard": (False, False, False), "zero1": (False, False, True),
           "shard_grad_op": (False, True, True), "full": (True, True, True)}


def zero_bytes_per_rank(n_params: int, world_size: int, sharding: str, precision: str = "fp32") -> dict:
    """The ZeRO paper's per-rank bytes for ``n_params`` (Psi) Adam-trained parameters over ``world_size`` ranks.

    ``precision``: ``"fp32"`` (4 + 4 + 8 bytes per parameter) or ``"mixed"`` (2 + 2 + 12).
    """
    sharding = normalize_sharding(sharding)
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"precision must be one of {tuple(BYTES_PER_PARAM)}, got {precision!r}")
    parts = {}
    for name, b, divided in zip(("params", "grads", "optimizer_state"), BYTES_PER_PARAM[precision], DIVIDED[sharding]):
        parts[name] = b * n_params / world_size if divided else float(b * n_params)
    parts["total"] = sum(parts.values())
    return parts


def normalize_sharding(sharding) -> str:
    key = sharding.lower() if isinstance(sharding, str) else sharding
    if key not in ALIASES:
        raise ValueError(
            f"sharding must be one of {SHARDINGS} (aliases: {sorted(set(ALIASES) - set(SHARDINGS))}), got {sharding!r}"
        )
    return ALIASES[key]


def check_options(sharding, mixed_precision=None, cpu_offload=False, reshard_after_forward=None,
                  use_orig_params=None, backward_prefetch=None, prefetch=None, reshard_last=None, reduce_dtype=None,
                  blocks_per_unit=None, lever_prefix="") -> tuple[str, str | None]:
    """Validate ``wrap``'s options without a model or a process group; returns (sharding, mixed_precision)
    normalised. Call it before ``init_process_group`` to fail in one process with one message. The block count
    limits (``prefetch``, ``blocks_per_unit``) are checked by ``wrap``, which sees the model."""
    sharding = normalize_sharding(sharding)
    if mixed_precision == "fp16":
        raise ValueError("mixed_precision='fp16' needs a gradient scaler, which curry_train does not implement; "
                         "use mixed_precision='bf16' (no loss scaling needed) or None")
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {mixed_precision!r}")
    mixed_precision = None if mixed_precision == "fp32" else mixed_precision
    fsdp = sharding in FSDP_MODES
    if cpu_offload and not fsdp:
        raise ValueError(f"cpu_offload=True needs an FSDP2 sharding {FSDP_MODES}, got sharding={sharding!r}")
    if reshard_after_forward is not None and not fsdp:
        raise ValueError(f"reshard_after_forward applies to FSDP2 shardings {FSDP_MODES}, not {sharding!r}")
    if use_orig_params is False:
        raise ValueError("use_orig_params=False is FSDP1's flat-parameter mode; FSDP2 always keeps the original "
                         "parameters (sharded per parameter as DTensors): drop the argument")
    if backward_prefetch not in (None, "backward_pre", "BACKWARD_PRE"):
        raise ValueError(
            f"backward_prefetch={backward_prefetch!r} is an FSDP1 option; FSDP2 always prefetches the next "
            "block's all-gather in backward (= 'backward_pre'). For explicit control pass prefetch=k (which calls "
            "FSDPModule.set_modules_to_backward_prefetch on the wrapped blocks)"
        )
    check_levers(sharding, mixed_precision, reshard_after_forward, prefetch, reshard_last, reduce_dtype,
                  blocks_per_unit, lever_prefix)
    return sharding, mixed_precision


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors if t is not None)


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())  # parameters() already yields a tied weight once


def unsharded_param_bytes(model: nn.Module) -> int:
    """Bytes of FSDP-managed parameters currently registered unsharded (plain tensors, not ``DTensor``).

    Zero at rest. Between forward and backward it is what ``reshard_after_forward=False`` keeps gathered.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for p in module.parameters():
            if id(p) not in seen and not isinstance(p, DTensor):
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


class DistributedOptimizer:
    """A data-parallel model and its optimizer, sharded as requested. Build with ``wrap``/``from_config``.

    Attributes: ``model`` (DDP module, FSDP2 root, or the plain model in one process), ``optimizer``,
    ``sharding``, ``group``, ``world_size``.
    """

    def __init__(self, model, optimizer, sharding: str, group=None, mixed_precision=None, cpu_offload=False,
                 world_size: int | None = None):
        self.model = model
        self.optimizer = optimizer
        self.sharding = sharding
        self.group = group
        self.mixed_precision = mixed_precision
        self.cpu_offload = cpu_offload
        self.world_size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        if world_size is not None:  # HSDP: a 2-D mesh has no single group; its ranks are the dp ranks
            self.world_size = world_size

    @classmethod
    def wrap(
        cls,
        model: nn.Module,
        sharding: str = "full",
        mixed_precision: str | None = None,
        cpu_offload: bool = False,
        reshard_after_forward: bool | int | None = None,
        *,
        process_group=None,
        mesh=None,
        block_types=None,
        optimizer_class=torch.optim.AdamW,
        param_groups=None,
        backward_prefetch: str | None = None,
        use_orig_params: bool | None = None,
        prefetch: int | None = None,
        reshard_last: bool | None = None,
        reduce_dtype: str | None = None,
        blocks_per_unit: int | None = None,
        blocks_optional: bool = False,
        **optimizer_kwargs,
    ) -> "DistributedOptimizer":
        """Shard ``model`` over ``process_group`` (default: the world) and build its optimizer.

        * ``mesh``: a ``DeviceMesh`` to shard over instead of ``process_group`` (FSDP2 modes only), e.g.
          ``ParallelState.fsdp_mesh``: 1-D (plain FSDP2), or 2-D ``(replicate, shard)``: HSDP, each parameter
          sharded over the second dim and replicated over the first (gradients reduce-scattered within, then
          all-reduced across). A model already tensor-parallel over ``mesh["tp"]`` of the same root mesh gets
          dp x tp DTensor parameters. ``process_group`` defaults to a 1-D mesh's group.

        * ``sharding``: ``no_shard`` | ``zero1`` | ``shard_grad_op`` | ``full`` (see the module docstring).
        * ``mixed_precision``: ``None``/``"fp32"`` or ``"bf16"``. FSDP2 modes use ``MixedPrecisionPolicy(
          param_dtype=bf16, reduce_dtype=fp32)`` (fp32 shards, bf16 compute, fp32 gradient reduction);
          DDP modes run the forward under ``torch.autocast(bf16)`` (fp32 params, grads and all-reduce).
        * ``cpu_offload``: FSDP2 ``CPUOffloadPolicy`` (params, grads and optimizer state live on CPU; the
          optimizer step runs there). FSDP2 modes only.
        * ``reshard_after_forward``: overrides the mode's choice for the blocks (True for ``full``, False for
          ``shard_grad_op``; an int reshards to that smaller world size). FSDP2 modes only.
        * ``block_types``: the block classes FSDP2 shards one unit each (default: ``find_blocks``' discovery);
          FSDP2 modes raise ``NoBlocksError`` (a ``ValueError``) when no block is found, before any collective,
          unless ``blocks_optional`` (a pipeline stage holding only the embedding or the head: one unit, the root).

        Step-time levers (FSDP2 modes; ``bench sharding`` measures each against DDP, skill
        ``primitive-distributed-optimizer``). ``None`` (the default) is auto, ``resolve_levers``: 2 blocks per unit,
        prefetch 1 and the last unit kept gathered under ``full``, where the model has the blocks for them:

        * ``blocks_per_unit`` (>= 1, <= the block count): consecutive blocks sharded as one FSDP unit
          (``fully_shard([b_i, ..., b_i+k-1])``): one all-gather and one reduce-scatter per unit instead of per
          block, ``ceil(B / k)`` of each per step; a unit's whole parameters are held while any of its blocks runs.
        * ``prefetch`` (>= 0, <= units - 1): explicit prefetch depth. Unit ``i`` prefetches the all-gathers of
          units ``i+1 .. i+prefetch`` in forward (``set_modules_to_forward_prefetch``) and ``i-1 .. i-prefetch``
          in backward (``set_modules_to_backward_prefetch``); up to ``prefetch`` more units held gathered. On CPU
          (gloo, no CUDA streams) the unshards are also issued with ``async_op=True``
          (``FSDPModule._set_unshard_async_op``) so a prefetched all-gather runs on gloo's thread while this
          rank computes; without it a CPU all-gather blocks where it is issued and prefetch only reorders.
        * ``reshard_last``: ``sharding='full'`` only: the last unit keeps its parameters gathered from forward to
          backward (``reshard_after_forward=False``, as torchtitan does): backward starts with it, so resharding it
          only to all-gather it again at once is one all-gather per step saved, for 1/units of Psi held.
        * ``reduce_dtype``: ``None``/``"fp32"`` or ``"bf16"`` (needs ``mixed_precision='bf16'``): the
          reduce-scatter dtype of ``MixedPrecisionPolicy(reduce_dtype=)``; bf16 halves its bytes and sums the
          N already-bf16 gradients in bf16 (one more rounding per step; not bitwise equal to the fp32 reduce).
        * ``optimizer_class(param_groups(model) or model.parameters(), **optimizer_kwargs)`` is built on the
          wrapped model; for ``zero1`` it is wrapped in ``ZeroRedundancyOptimizer``. ``optimizer_class=None``
          builds none: build your own on ``.model`` and hand it to ``shard_optimizer``.

        One process without ``torch.distributed`` initialised: ``no_shard`` returns the model unchanged;
        every other mode is an error that says how to launch. ``no_shard`` over a group of one rank (e.g. a
        pure pipeline-parallel run) also leaves the model unwrapped.
        """
        sharding, mixed_precision = check_options(sharding, mixed_precision, cpu_offload, reshard_after_forward,
                                                  use_orig_params, backward_prefetch, prefetch, reshard_last,
                                                  reduce_dtype, blocks_per_unit)
        fsdp = sharding in FSDP_MODES
        if mesh is not None:
            if not fsdp:
                raise ValueError(f"mesh= is for the FSDP2 shardings {FSDP_MODES}; sharding={sharding!r} takes "
                                 "process_group=")
            if mesh.ndim not in (1, 2):
                raise ValueError(f"mesh must be 1-D (the data-parallel dim, e.g. ParallelState.fsdp_mesh) or 2-D "
                                 f"(replicate, shard: HSDP), got {mesh.ndim} dims")
            if process_group is None and mesh.ndim == 1:
                process_group = mesh.get_group()
        blocks = None
        if fsdp:
            blocks = find_blocks(model, block_types) if blocks_optional else \
                require_blocks(model, block_types, purpose=f"sharding={sharding!r} (FSDP2 shards each block)")
            if blocks:
                check_lever_limits(len(blocks), prefetch, blocks_per_unit)
            levers = resolve_levers(sharding, len(blocks), prefetch, reshard_last, blocks_per_unit,
                                    reshard_after_forward)
            prefetch, reshard_last, blocks_per_unit = (levers[k] for k in ("prefetch", "reshard_last",
                                                                            "blocks_per_unit"))
        device = next(iter(model.parameters()), torch.zeros(0)).device
        if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"mixed_precision='bf16' but {torch.cuda.get_device_name(device)} has no bf16 support; "
                             "use mixed_precision=None (fp32)")

        initialised = dist.is_available() and dist.is_initialized()
        if not initialised or (sharding == "no_shard" and dist.get_world_size(process_group) == 1):
            if sharding != "no_shard":
                raise ValueError(
                    f"sharding={sharding!r} needs torch.distributed initialised (one rank per process). Launch with "
                    f"`torchrun --nproc-per-node N -m curry_train train parallel.sharding={sharding}` (or call "
                    "torch.distributed.init_process_group first); in one process use sharding='no_shard'"
                )
            if mixed_precision == "bf16":
                autocast_forward(model, device)
            return cls(model, _build_optimizer(model, optimizer_class, param_groups, optimizer_kwargs), sharding,
                       process_group, mixed_precision, cpu_offload)

        if fsdp:
            wrapped = fully_shard_blocks(model, blocks, sharding, mixed_precision, cpu_offload, reshard_after_forward,
                                   process_group, device, mesh, prefetch=prefetch, reshard_last=reshard_last,
                                   reduce_dtype=reduce_dtype, blocks_per_unit=blocks_per_unit)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if mixed_precision == "bf16":
                autocast_forward(model, device)
            device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
                if device.type == "cuda" else None
            wrapped = DDP(model, process_group=process_group, device_ids=device_ids)
        self = cls(wrapped, None, sharding, process_group, mixed_precision, cpu_offload,
                   world_size=mesh.size() if mesh is not None else None)
        optimizer = _build_optimizer(wrapped, optimizer_class, param_groups, optimizer_kwargs)
        if optimizer is not None:
            self.shard_optimizer(optimizer)
        return self

    @classmethod
    def from_config(cls, cfg, model: nn.Module, process_group=None, **kwargs) -> "DistributedOptimizer":
        """``wrap`` with ``sharding``, ``mixed_precision``, ``cpu_offload`` and the levers ``fsdp_prefetch``,
        ``fsdp_reshard_last``, ``fsdp_blocks_per_unit`` (``wrap``'s ``prefetch``, ``reshard_last``,
        ``blocks_per_unit``) read from ``cfg`` (any mapping or attribute object, e.g. Hydra's ``cfg.parallel``);
        ``kwargs`` go to ``wrap`` (optimizer settings)."""
        get = config_getter(cfg)
        levers = {k: get(f"fsdp_{k}", None) for k in ("prefetch", "reshard_last", "blocks_per_unit")}
        try:
            check_options(get("sharding", "no_shard"), get("mixed_precision", None), bool(get("cpu_offload", False)),
                          lever_prefix="fsdp_", **levers)
            return cls.wrap(model, get("sharding", "no_shard"), get("mixed_precision", None),
                            bool(get("cpu_offload", False)), process_group=process_group, **levers, **kwargs)
        except NoBlocksError:
            raise  # about the model, not a config key
        except ValueError as e:  # wrap's block-count check names the argument: name the config key
            msg = str(e)
            raise ValueError(f"parallel.{'fsdp_' if msg.startswith(('prefetch=', 'blocks_per_unit=')) else ''}{msg}") \
                from None

    def shard_optimizer(self, optimizer: torch.optim.Optimizer, expert_params=(),
                        expert_group=None) -> torch.optim.Optimizer:
        """An optimizer built on ``self.model`` made right for this sharding: for ``zero1`` the same class,
        param groups and settings inside ``ZeroRedundancyOptimizer`` (each rank keeps state for ~1/N of the
        parameters; ``primitives.zero1``); otherwise ``optimizer`` itself (FSDP2 params are already shards).
        ``expert_params`` (expert parallelism: this rank's bank slices) are sharded over ``expert_group`` (the ranks
        holding the same experts) by a second optimizer instead (``zero1.zero1_optimizer``). Becomes
        ``self.optimizer``."""
        if self.sharding == "zero1" and dist.is_available() and dist.is_initialized():
            optimizer = zero1_optimizer(optimizer, self.group, expert_params, expert_group)
        self.optimizer = optimizer
        return optimizer

    def optimizer_state_bytes(self) -> int:
        return 0 if self.optimizer is None else state_bytes(self.optimizer)

    def memory_report(self) -> dict:
        """This rank's bytes of parameters, gradients and optimizer state, as held now.

        Call it after backward and before ``zero_grad(set_to_none=True)`` to see gradients, after at least one
        ``optimizer.step()`` to see optimizer state. ``full_param_bytes`` is the unsharded parameter size
        (``n_params`` x element size) for comparison; ``unsharded_param_bytes`` counts FSDP2 parameters
        currently gathered (nonzero only between forward and backward).
        """
        params = _unique_params(self.model)
        report = {
            "sharding": self.sharding,
            "world_size": self.world_size,
            "n_params": sum(p.numel() for p in params),
            "full_param_bytes": sum(p.numel() * p.element_size() for p in params),
            "params": _nbytes(params),
            "grads": _nbytes(p.grad for p in params),
            "optimizer_state": self.optimizer_state_bytes(),
        }
        report["total"] = report["params"] + report["grads"] + report["optimizer_state"]
        report["unsharded_param_bytes"] = unsharded_param_bytes(self.model) if self.sharding in FSDP_MODES else 0
        return report

    def __repr__(self) -> str:
        return (f"DistributedOptimizer(sharding={self.sharding!r}, world_size={self.world_size}, "
                f"mixed_precision={self.mixed_precision!r}, cpu_offload={self.cpu_offload})")


def _build_optimizer(model, optimizer_class, param_groups, kwargs):
    if optimizer_class is None:
        return None
    groups = param_groups(model) if callable(param_groups) else model.parameters()
    return optimizer_class(groups, **kwargs)


def autocast_forward(model: nn.Module, device: torch.device) -> None:
    """bf16 without FSDP2 (DDP, ZeRO-1, one process, plain pipeline stages): the forward under autocast; fp32 weights."""
    model.forward = torch.autocast(device_type=device.type, dtype=torch.bfloat16)(model.forward)
