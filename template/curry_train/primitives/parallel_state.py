"""``ParallelState``: one rank grid for data (plain or HSDP), pipeline, context and tensor parallelism.

The world's ranks are laid out as ``torch.arange(world_size).view(*sizes)`` with the dims in ``order``,
**outermost first**: with the default ``order="pp-dp-cp-tp"`` the tp coordinate varies fastest (ranks 0 and 1
are tp neighbours, so tensor-parallel traffic stays on one node), then cp, then dp, and pp varies slowest.
This is picotron's ``arange(world).view(dp, pp, cp, tp)`` with the order made a parameter, and Megatron's
``RankGenerator(order=...)`` string written outermost-first. Every group is a slice of that one grid: the dp
group of a rank is the set of ranks that share its pp, cp and tp coordinates, and so on.

HSDP. The dp dim is itself ``dp_replicate x dp_shard`` (replicate outer: ``dp_rank = replicate_rank * dp_shard +
shard_rank``), torchtitan's ``[pp, dp_replicate, dp_shard, cp, tp]``. ``dp_shard=-1`` (the default) is
``dp / dp_replicate``; with ``dp_replicate = 1`` (the default) the grid is the plain 4-dim one.

After the process group exists, the grid becomes one ``torch.distributed.device_mesh.DeviceMesh`` with the five
dims ``order`` names, ``dp`` spelled ``dp_replicate, dp_shard`` (size-1 dims kept), plus three flattened dims
kept on this object (``submesh(name)``): ``dp`` (= dp_replicate x dp_shard: batch rows, DDP, ZeRO-1), ``dp_cp``
(= dp x cp: tokens counted and gradients averaged over every data shard) and ``dp_shard_cp`` (= dp_shard x cp:
what FSDP2 shards over; cp folded in as torchtitan does, since the cp ranks of a replica hold the same weights).
``fsdp_mesh`` is the mesh ``fully_shard`` takes: ``dp_shard_cp`` (1-D), or ``(dp_replicate, dp_shard_cp)`` (2-D:
shard within, replicate across = HSDP) when ``dp_replicate > 1``. ``dp_group`` ... ``tp_group`` are the per-dim
process groups; ``tp_mesh`` / ``dp_mesh`` the 1-D sub-meshes (``apply_tensor_parallel`` takes ``tp_mesh``).
In one process (no process group) there is no mesh: every group is ``None`` (collectives are skipped) and every
coordinate is 0.

``dp=-1`` means "whatever the other dims leave": ``dp = world_size / (pp * cp * tp)``. Sizes are checked by
``ParallelState.resolve_sizes`` / ``resolve_data_parallel`` without any process group, so a bad grid fails
before ranks start.

Expert parallelism (``ep``) is not a dim of the grid: the ep ranks are a sub-group of the ranks that hold different
tokens with the same weights, dp x cp (``dp_cp_ranks``; Megatron's and torchtitan's ep within dp, and within cp:
a mixture of experts routes each token alone, so the cp ranks' tokens are routed like the dp ranks'). Each dp x cp
group (ranks in ascending order) is cut into ``dp cp / ep`` blocks of ``ep`` consecutive ranks; ``ep_group`` is
this rank's block (its MoE layers' experts are sharded over it) and ``expert_dp_group`` the ranks of its dp x cp
group with the same ep coordinate (they hold the same experts, whose gradients are averaged over it; ``None`` when
``ep == dp cp``). Both are built collectively when ``ep > 1``; with pp each stage has its own.
No module-level state: build one object and pass it around.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._checks import positive_int
from ._config import config_getter

DIMS = ("pp", "dp", "cp", "tp")
DEFAULT_ORDER = "pp-dp-cp-tp"
FLATTENED = {"dp": ("dp_replicate", "dp_shard"), "dp_cp": ("dp_replicate", "dp_shard", "cp"),
             "dp_shard_cp": ("dp_shard", "cp")}  # mesh dims made of several grid dims (module docstring)


def _positive(name: str, value, allow_minus_one: bool = False) -> int:
    """``parallel.<name>`` as a positive integer (or -1 for dp); the grid's sizes are named as config keys."""
    if allow_minus_one and value == -1 and not isinstance(value, bool):
        return -1
    return positive_int(f"parallel.{name}", value, "or -1 (= what the other dims leave)" if allow_minus_one else "")


def parse_order(order: str) -> tuple[str, ...]:
    """``"pp-dp-cp-tp"`` -> ``("pp", "dp", "cp", "tp")``; each of pp, dp, cp, tp exactly once."""
    dims = tuple(str(order).split("-"))
    if sorted(dims) != sorted(DIMS):
        raise ValueError(
            f"parallel.order={order!r} must name each of {', '.join(DIMS)} exactly once, joined by '-', "
            f"outermost first (e.g. {DEFAULT_ORDER!r})"
        )
    return dims


class ParallelState:
    """The rank grid, its ``DeviceMesh`` and one process group per dim.

    Attributes: ``sizes`` (dict dim -> size), ``order`` (tuple of dims, outermost first), ``world_size``,
    ``rank``, ``coords`` (dict dim -> this rank's coordinate), ``mesh`` (``DeviceMesh`` or ``None``),
    ``dp``/``pp``/``cp``/``tp`` (sizes), ``dp_rank``... (coordinates), ``dp_group``... (process groups),
    ``dp_mesh``/``tp_mesh`` (1-D sub-meshes, ``submesh(dim)``); ``dp_replicate``/``dp_shard`` (HSDP sizes,
    ``dp = dp_replicate * dp_shard``), ``fsdp_mesh``; ``ep``, ``ep_rank``, ``ep_group`` and ``expert_dp_group``
    (expert parallelism within dp, module docstring; the groups ``None`` unless ep > 1).
    """

    def __init__(self, dp: int = -1, pp: int = 1, tp: int = 1, cp: int = 1, order: str = DEFAULT_ORDER,
                 world_size: int | None = None, device_type: str | None = None, ep: int = 1,
                 dp_replicate: int = 1, dp_shard: int = -1):
        distributed = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = dist.get_world_size() if distributed else 1
        elif distributed and world_size != dist.get_world_size():
            raise ValueError(f"world_size={world_size} but the process group has {dist.get_world_size()} ranks")
        self.order = parse_order(order)
        self.sizes = self.resolve_sizes(world_size, dp=dp, pp=pp, tp=tp, cp=cp, order=order)
        self.dp_replicate, self.dp_shard = self.resolve_data_parallel(self.sizes["dp"], dp_replicate, dp_shard)
        self.world_size = world_size
        self.rank = dist.get_rank() if distributed else 0
        if self.rank >= world_size:
            raise ValueError(f"rank {self.rank} is outside a grid of world size {world_size}")
        self.grid = torch.arange(world_size).view(*[self.sizes[d] for d in self.order])
        self.coords = self.coordinates(self.rank)
        self.mesh, self._flat = None, {}
        if distributed:
            from torch.distributed.device_mesh import init_device_mesh

            if device_type is None:
                device_type = "cuda" if torch.cuda.is_available() else "cpu"
            names = self.mesh_dim_names()
            split = {"dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard}
            self.mesh = init_device_mesh(device_type, tuple(split.get(n) or self.sizes[n] for n in names),
                                         mesh_dim_names=names)
            # kept here, not sliced from the root by name again (PyTorch deprecates slicing flattened dims)
            self._flat = {name: self.mesh[tuple(sorted(dims, key=names.index))]._flatten(name)
                          for name, dims in FLATTENED.items()}
        self.ep = self.check_ep(ep, self.sizes["dp"], self.sizes["cp"])
        self.ep_rank = 0 if self.ep == 1 else \
            next(g.index(self.rank) for g in self.dp_cp_ranks() if self.rank in g) % self.ep
        self.ep_group = self.expert_dp_group = self._expert_dp = None
        self.device_type = device_type
        if distributed and self.ep > 1:
            self.ep_group, _ = dist.new_subgroups_by_enumeration(self.ep_ranks())  # collective: same order everywhere
            self._expert_dp, _ = dist.new_subgroups_by_enumeration(self.expert_dp_ranks())  # one rank when ep == dp
            self.expert_dp_group = self._expert_dp if self.ep < self.sizes["dp"] * self.sizes["cp"] else None

    # -- sizes, without a process group -------------------------------------------------------------
    @staticmethod
    def resolve_sizes(world_size: int, dp: int = -1, pp: int = 1, tp: int = 1, cp: int = 1,
                      order: str = DEFAULT_ORDER) -> dict[str, int]:
        """Sizes of every dim for ``world_size`` ranks; ``dp=-1`` takes what pp*cp*tp leave.

        Raises ``ValueError`` naming every size when the product is not the world size.
        """
        parse_order(order)
        positive_int("world size", world_size)
        pp, tp, cp = _positive("pp", pp), _positive("tp", tp), _positive("cp", cp)
        dp = _positive("dp", dp, allow_minus_one=True)
        model_parallel = pp * cp * tp
        if dp == -1:
            if world_size % model_parallel:
                raise ValueError(
                    f"world size {world_size} is not divisible by parallel.pp*cp*tp = {pp}*{cp}*{tp} = {model_parallel} "
                    f"(parallel.dp=-1 takes what is left)"
                )
            dp = world_size // model_parallel
        if dp * model_parallel != world_size:
            raise ValueError(
                f"parallel.dp={dp} * pp={pp} * cp={cp} * tp={tp} = {dp * model_parallel} != world size {world_size}; "
                f"set the sizes so their product is {world_size}, or parallel.dp=-1"
            )
        return {"pp": pp, "dp": dp, "cp": cp, "tp": tp}

    @staticmethod
    def resolve_data_parallel(dp: int, dp_replicate=1, dp_shard=-1) -> tuple[int, int]:
        """``(dp_replicate, dp_shard)`` for a data-parallel size ``dp``: ``dp_shard=-1`` takes ``dp / dp_replicate``.

        Raises ``ValueError`` naming the keys when ``dp_replicate`` does not divide ``dp`` or the product is not
        ``dp``."""
        rep = positive_int("parallel.dp_replicate", dp_replicate)
        shard = _positive("dp_shard", dp_shard, allow_minus_one=True)
        if shard == -1:
            if dp % rep:
                raise ValueError(f"parallel.dp_replicate={rep} must divide the data-parallel size {dp} "
                                 "(parallel.dp_shard=-1 takes what is left)")
            shard = dp // rep
        if rep * shard != dp:
            raise ValueError(f"parallel.dp_replicate={rep} * dp_shard={shard} = {rep * shard} != the data-parallel "
                             f"size {dp}; set dp_shard=-1 (= dp / dp_replicate) or sizes whose product is {dp}")
        return rep, shard

    @staticmethod
    def check_ep(ep, dp: int, cp: int = 1) -> int:
        """``parallel.ep`` as a positive integer dividing ``dp * cp`` (the ranks holding different tokens)."""
        ep = positive_int("parallel.ep", ep)
        if (dp * cp) % ep:
            size = f"data x context-parallel size dp * cp = {dp} * {cp} = {dp * cp}" if cp > 1 else \
                f"data-parallel size {dp}"
            raise ValueError(f"parallel.ep={ep} must divide the {size} (expert-parallel ranks are a sub-group of the "
                             "ranks holding different tokens)")
        return ep

    @classmethod
    def from_config(cls, cfg, world_size: int | None = None, device_type: str | None = None) -> "ParallelState":
        """From ``cfg.parallel`` (any mapping or attribute object with dp, pp, tp, cp and optionally order)."""
        get = config_getter(cfg)
        return cls(dp=get("dp", -1), pp=get("pp", 1), tp=get("tp", 1), cp=get("cp", 1),
                   order=get("order", DEFAULT_ORDER), world_size=world_size, device_type=device_type,
                   ep=get("ep", 1), dp_replicate=get("dp_replicate", 1), dp_shard=get("dp_shard", -1))

    @staticmethod
    def sizes_from_config(cfg, world_size: int) -> dict[str, int]:
        """``resolve_sizes`` from a config: the check ``config.validate`` runs before any process group."""
        get = config_getter(cfg)
        sizes = ParallelState.resolve_sizes(world_size, dp=get("dp", -1), pp=get("pp", 1), tp=get("tp", 1),
                                            cp=get("cp", 1), order=get("order", DEFAULT_ORDER))
        ParallelState.resolve_data_parallel(sizes["dp"], get("dp_replicate", 1), get("dp_shard", -1))
        ParallelState.check_ep(get("ep", 1), sizes["dp"], sizes["cp"])
        return sizes

    # -- the grid ------------------------------------------------------------------------------------
    def mesh_dim_names(self) -> tuple[str, ...]:
        """The ``DeviceMesh``'s dims: ``order`` with ``dp`` spelled ``dp_replicate, dp_shard`` (replicate outer)."""
        return tuple(n for d in self.order for n in (FLATTENED["dp"] if d == "dp" else (d,)))

    def coordinates(self, rank: int) -> dict[str, int]:
        """Coordinates of global ``rank`` in the grid, e.g. ``{"pp": 1, "dp": 0, "cp": 0, "tp": 1}``."""
        index = (self.grid == rank).nonzero()
        if index.numel() == 0:
            raise ValueError(f"rank {rank} is not in a grid of world size {self.world_size}")
        return {d: int(i) for d, i in zip(self.order, index[0])}

    def group_ranks(self, dim: str) -> list[list[int]]:
        """Every group of ``dim`` as a list of global ranks (ranks that differ only in ``dim``)."""
        axis = self._axis(dim)
        moved = self.grid.movedim(axis, -1).reshape(-1, self.sizes[dim])
        return [row.tolist() for row in moved]

    def ranks_in_group(self, dim: str, rank: int | None = None) -> list[int]:
        """The global ranks in ``rank``'s (default: this rank's) ``dim`` group, in ``dim``-coordinate order."""
        rank = self.rank if rank is None else rank
        return next(g for g in self.group_ranks(dim) if rank in g)

    def group(self, dim: str):
        """The process group of ``dim`` (``None`` in one process): a grid dim, ``dp_replicate``/``dp_shard``, or
        a flattened one (``dp_cp``, ``dp_shard_cp``)."""
        mesh = self.submesh(dim)
        return None if mesh is None else mesh.get_group()

    def dp_cp_ranks(self) -> list[list[int]]:
        """The groups of ranks that share pp and tp coordinates: every rank of a data-parallel replica of the
        sequence-sharded model (dp x cp). Gradients are averaged and tokens counted over these."""
        dims = [d for d in self.order if d not in ("dp", "cp")] + [d for d in self.order if d in ("dp", "cp")]
        moved = self.grid.permute([self._axis(d) for d in dims]).reshape(-1, self.sizes["dp"] * self.sizes["cp"])
        return [sorted(row.tolist()) for row in moved]

    def ep_ranks(self) -> list[list[int]]:
        """Every expert-parallel group: each dp x cp group cut into blocks of ``ep`` consecutive ranks."""
        return [g[i:i + self.ep] for g in self.dp_cp_ranks() for i in range(0, len(g), self.ep)]

    def expert_dp_ranks(self) -> list[list[int]]:
        """Every expert-data-parallel group: the ranks of a dp x cp group with the same ep coordinate (same
        experts)."""
        return [g[i::self.ep] for g in self.dp_cp_ranks() for i in range(self.ep)]

    @property
    def dp_cp_group(self):
        """The dp x cp process group (``dp_cp_ranks``; the dp group when cp = 1); ``None`` in one process."""
        return self.group("dp_cp")

    def submesh(self, dim: str):
        """The 1-D ``DeviceMesh`` of ``dim`` (a grid dim, ``dp_replicate``, ``dp_shard`` or a flattened dim of the
        module docstring), or ``None`` in one process."""
        if dim not in FLATTENED and dim not in FLATTENED["dp"]:
            self._axis(dim)
        if self.mesh is None:
            return None
        return self._flat[dim] if dim in self._flat else self.mesh[dim]

    @property
    def expert_fsdp_mesh(self):
        """The 1-D mesh of ``expert_dp_ranks`` (one rank when ep == dp cp) that FSDP2 shards an expert-parallel bank's
        slices over (ranks holding the same experts); ``None`` unless ep > 1 in a process group."""
        if self._expert_dp is None:
            return None
        from torch.distributed.device_mesh import DeviceMesh

        return DeviceMesh.from_group(self._expert_dp, self.device_type)

    @property
    def fsdp_mesh(self):
        """What FSDP2's ``fully_shard(mesh=)`` takes: ``dp_shard_cp`` (1-D), or the 2-D ``(dp_replicate,
        dp_shard_cp)`` when ``dp_replicate > 1`` (HSDP: shard within, replicate across); ``None`` in one process."""
        if self.mesh is None:
            return None
        if self.dp_replicate == 1:
            return self._flat["dp_shard_cp"]
        from torch.distributed.device_mesh import DeviceMesh

        return DeviceMesh._concatenate([self.mesh["dp_replicate"], self._flat["dp_shard_cp"]])

    def _axis(self, dim: str) -> int:
        if dim not in DIMS:
            raise ValueError(f"unknown parallel dim {dim!r}; choose from {', '.join(DIMS)}")
        return self.order.index(dim)

    # -- convenience names ---------------------------------------------------------------------------
    dp = property(lambda self: self.sizes["dp"])
    pp = property(lambda self: self.sizes["pp"])
    cp = property(lambda self: self.sizes["cp"])
    tp = property(lambda self: self.sizes["tp"])
    dp_rank = property(lambda self: self.coords["dp"])
    pp_rank = property(lambda self: self.coords["pp"])
    cp_rank = property(lambda self: self.coords["cp"])
    tp_rank = property(lambda self: self.coords["tp"])
    dp_group = property(lambda self: self.group("dp"))
    pp_group = property(lambda self: self.group("pp"))
    cp_group = property(lambda self: self.group("cp"))
    tp_group = property(lambda self: self.group("tp"))
    dp_mesh = property(lambda self: self.submesh("dp"))
    tp_mesh = property(lambda self: self.submesh("tp"))
    is_first_stage = property(lambda self: self.coords["pp"] == 0)
    is_last_stage = property(lambda self: self.coords["pp"] == self.sizes["pp"] - 1)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{d}={self.sizes[d]}" for d in self.order)
        return f"ParallelState({sizes}, order={'-'.join(self.order)!r}, world_size={self.world_size})"

    def __str__(self) -> str:
        """The rank grid: one line per global rank with its coordinates, then each dim's groups."""
        head = " x ".join(f"{d}{self.sizes[d]}" for d in self.order)
        if self.dp_replicate > 1:
            head += f" (dp = dp_replicate{self.dp_replicate} x dp_shard{self.dp_shard}: HSDP)"
        lines = [f"rank grid {head} = {self.world_size} rank(s), order {'-'.join(self.order)} (outermost first)",
                 "rank  " + " ".join(f"{d:>3s}" for d in self.order)]
        for r in range(self.world_size):
            c = self.coordinates(r)
            lines.append(f"{r:4d}  " + " ".join(f"{c[d]:3d}" for d in self.order))
        for d in self.order:
            lines.append(f"{d} groups: {self.group_ranks(d)}")
        return "\n".join(lines)
