"""Find a model's repeated transformer blocks, whatever the layout: the one place recompute, FSDP2 and pipeline
splitting ask "which modules are the blocks?".

``find_blocks(model, block_types=None)`` returns the blocks in forward order:

1. ``block_types`` given: every instance of those classes, outermost only (a block inside a block is not a block).
2. Else the first of ``KNOWN_PATHS`` that names an ``nn.ModuleList`` / ``nn.ModuleDict`` of modules of one class:
   the reference GPT and nanoGPT-style ``blocks`` / ``transformer.h``, Hugging Face ``model.layers`` (Llama,
   Mistral, Qwen...) and ``transformer.h`` (GPT-2), torchtitan's ``layers`` (an ``nn.ModuleDict`` keyed "0", "1"...).
3. Else every outermost ``nn.ModuleList`` / ``nn.ModuleDict`` whose children are two or more modules of one class
   holding parameters, in the order ``named_modules`` visits them.

"One class" looks through in-place re-classing (``block_class``): ``Recompute`` and FSDP2's ``fully_shard`` turn a
``Block`` into ``Recompute<Block>`` / ``FSDP<Block>``, and a stack where only every n-th block recomputes is still
found.

``require_blocks`` raises ``NoBlocksError`` (a ``ValueError``) naming the model's class and how to pass
``block_types``, instead of silently treating the whole model as one unit.
"""

from __future__ import annotations

import torch.nn as nn

KNOWN_PATHS = ("blocks", "layers", "h", "model.layers", "transformer.h", "transformer.blocks", "transformer.layers",
               "model.decoder.layers", "gpt_neox.layers", "decoder.layers")


class NoBlocksError(ValueError):
    """The model has no block container that ``find_blocks`` recognises and no ``block_types`` was given."""


def _get(model: nn.Module, path: str):
    module = model
    for part in path.split("."):
        module = getattr(module, part, None) if isinstance(module, nn.Module) else None
    return module


def _fsdp_module_class() -> tuple:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return ()
    return (FSDPModule,)


_RECLASSED: dict[tuple[type, type], type] = {}


def reclass(module: nn.Module, mixin: type) -> nn.Module:
    """Give ``module`` the class ``<Mixin><Class>`` (``mixin`` first in the MRO), in place, as FSDP2's ``fully_shard``
    does: parameter names and state-dict keys stay the same, ``isinstance`` holds for both classes. One class per
    ``(mixin, class)`` pair; a module that already has the mixin is left as it is. Used by ``Recompute`` and
    ``ContextParallel`` (mark the mixin ``_reclasses_in_place`` so ``block_class`` sees through it)."""
    if not isinstance(module, mixin):
        base = type(module)
        if (mixin, base) not in _RECLASSED:
            _RECLASSED[(mixin, base)] = type(f"{mixin.__name__}{base.__name__}", (mixin, base), {})
        module.__class__ = _RECLASSED[(mixin, base)]
    return module


def block_class(module: nn.Module) -> type:
    """``module``'s own class, seen through in-place re-classing: ``Recompute`` (classes marked
    ``_reclasses_in_place``) and FSDP2's ``fully_shard`` make ``Recompute<Block>`` / ``FSDP<Block>`` subclasses,
    and a half-recomputed stack is still one kind of block."""
    wrappers = _fsdp_module_class()
    for cls in type(module).__mro__:
        if not getattr(cls, "_reclasses_in_place", False) and not (wrappers and issubclass(cls, wrappers)):
            return cls
    return type(module)


def _homogeneous_children(container) -> list[nn.Module] | None:
    """The children of an ``nn.ModuleList`` / ``nn.ModuleDict`` when they are modules of one class."""
    if not isinstance(container, (nn.ModuleList, nn.ModuleDict)):
        return None
    children = list(container.values()) if isinstance(container, nn.ModuleDict) else list(container)
    if not children or len({block_class(c) for c in children}) != 1:
        return None
    return children


def _as_types(block_types) -> tuple[type, ...]:
    types = tuple(block_types) if isinstance(block_types, (list, tuple, set)) else (block_types,)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise ValueError(f"block_types must be nn.Module classes, got {block_types!r}")
    return types


def find_blocks(model: nn.Module, block_types=None) -> list[nn.Module]:
    """The repeated blocks of ``model`` in forward order (see the module docstring); ``[]`` if there are none."""
    if block_types is not None:
        types = _as_types(block_types)
        found, prefixes = [], []
        for name, m in model.named_modules():  # pre-order: a block comes before anything inside it
            if isinstance(m, types) and not any(name.startswith(p + ".") for p in prefixes):
                found.append(m)
                prefixes.append(name)
        return found
    for path in KNOWN_PATHS:
        children = _homogeneous_children(_get(model, path))
        if children:
            return children
    found, prefixes = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in prefixes):
            continue
        children = _homogeneous_children(m)
        if children and len(children) >= 2 and any(True for _ in children[0].parameters()):
            found.extend(children)
            prefixes.append(name)
    return found


def require_blocks(model: nn.Module, block_types=None, purpose: str = "this") -> list[nn.Module]:
    """``find_blocks``, or ``NoBlocksError`` saying what was looked for and how to name the blocks."""
    blocks = find_blocks(model, block_types)
    if blocks:
        return blocks
    if block_types is not None:
        names = ", ".join(t.__name__ for t in _as_types(block_types))
        raise NoBlocksError(f"{type(model).__name__} has no module of block_types ({names}) for {purpose}")
    raise NoBlocksError(
        f"found no transformer blocks in {type(model).__name__} for {purpose}: looked for an nn.ModuleList or "
        f"nn.ModuleDict of same-class modules (at {', '.join(KNOWN_PATHS[:6])}, ... or anywhere); "
        "pass block_types=(YourBlockClass,)"
    )
