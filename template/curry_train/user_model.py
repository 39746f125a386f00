"""The model ``train`` and every bench build, and the loss they train it with: the reference GPT, or the user's own.

Your model (Hydra-native): ``model._target_=pkg.module.factory`` makes the model
``hydra.utils.instantiate(cfg.model)`` = ``factory(**kwargs)``, every other ``model.KEY=VALUE`` a keyword argument
(``user_overrides``, applied by ``config.load_config``, picks the key-free preset ``conf/model/custom.yaml`` and
adds those keys with ``++``: no ``+`` is needed and no GPT key is passed). Without ``_target_`` the model is the
reference GPT of the ``model=tiny|small`` preset.

What the model must do: be an ``nn.Module``; take token ids 0..255 (the data are bytes, vocab 256); ``model(x)`` on
``x`` (B, T) int64 returns logits (B, T, V >= 256), as a tensor, a ``ModelOutput`` / dict with ``logits`` or a
tuple whose first element is the logits (``primitives.model_io``). The loss is then ``model_io.forward_loss_sum``:
``(sum of cross-entropy over targets != -100, their count)`` on the pair ``(x, y)``, ``y`` aligned with the logits.

Your loss: when the forward is not ``(idx) -> logits`` (it needs the targets, extra inputs, returns its own loss),
``train.loss._target_=pkg.module.fn`` (keyword arguments ``train.loss.KEY=VALUE``) replaces it:
``fn(model, batch, **kwargs) -> (loss_sum, n_valid)`` with ``batch = (x, y)`` as above, ``loss_sum`` the *summed*
token loss (a scalar tensor) and ``n_valid`` the number of targets in ``y`` that are not -100: gradient
accumulation divides by the step's total of those counts.

``check_model(cfg)`` (called by ``config.validate``, before any process group) finds, in one process, a target that
cannot be imported, keyword arguments the factory does not take, a factory that returns no ``nn.Module``, fewer than
256 token ids, and a forward (or loss) that cannot take a 1 x 2 batch: one ``ValueError`` line each. It builds the
model once on CPU under a forked RNG (the caller's random state is untouched) and returns what ``validate`` checks
the rest against (``ModelInfo``: context for ``train.seq_len``, blocks for recompute, FSDP2 and the pipeline split).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from .model import GPT, GPTConfig
from .primitives.blocks import find_blocks
from .primitives.model_io import forward, forward_loss_sum, logits_of

VOCAB = 256  # byte-level data (data.tokenizer=bytes): token ids 0..255
HYDRA_KEYS = frozenset({"_target_", "_args_", "_partial_", "_recursive_", "_convert_"})
RUN_KEYS = frozenset({"init_from"})  # model.* keys the run reads (export_hf.init_from), never the factory's
# where a model says how long a sequence it takes: on itself or on its config object, first found wins
CONTEXT_ATTRS = ("block_size", "max_seq_len", "max_position_embeddings", "n_positions", "n_ctx", "context_length")
CONFIG_ATTRS = ("", "config", "cfg", "model_args", "args")
USER_PRESET = "custom"  # conf/model/custom.yaml: the user's model, keys free
FREE_KEYS = ("train.loss.",)  # always the keyword arguments of a user's function; model.* too with USER_PRESET


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def user_overrides(overrides: list[str]) -> list[str]:
    """``model._target_=X`` selects the ``custom`` preset (unless a ``model=`` preset is given, which must then be
    ``custom``); with it every ``model.KEY=VALUE``, and always ``train.loss.KEY=VALUE``, becomes ``++KEY=VALUE``
    (set or add): the keyword arguments of the user's factory or loss, which no schema declares."""
    keys = [_override_key(o) for o in overrides]
    presets = [o.split("=", 1)[1] for o, k in zip(overrides, keys) if k == "model" and not o.startswith("~")]
    preset = presets[-1] if presets else None
    if "model._target_" in keys:
        if preset is None:
            overrides, keys, preset = [f"model={USER_PRESET}", *overrides], ["model", *keys], USER_PRESET
        elif preset != USER_PRESET:
            raise ValueError(f"model._target_ names your own model, which replaces the GPT presets: drop "
                             f"model={preset} (or use model={USER_PRESET})")
    free = FREE_KEYS + (("model.",) if preset == USER_PRESET else ())
    return [f"++{o.lstrip('+')}" if k.startswith(free) and not o.startswith("~") else o
            for o, k in zip(overrides, keys)]


@dataclass
class ModelInfo:
    """What ``config.validate`` needs from the model: its context (None = not known) and how many blocks it has."""

    name: str
    context: int | None
    context_source: str | None
    n_layer: int


def user_target(model_cfg) -> str | None:
    """``model._target_``, or None for the reference GPT."""
    return model_cfg.get("_target_") if hasattr(model_cfg, "get") else None


def model_name(cfg) -> str:
    """For printouts: ``tiny GPT`` (the preset), or the user's ``_target_``."""
    return user_target(cfg.model) or f"{cfg.model.get('name', '')} GPT".strip()


def n_params(model: nn.Module) -> int:
    """Unique parameters (a tied weight counted once)."""
    return sum(p.numel() for p in model.parameters())


def _kwargs(node) -> dict:
    """The keyword arguments of a ``_target_`` node (its keys but Hydra's own)."""
    return {str(k): v for k, v in node.items() if k not in HYDRA_KEYS | RUN_KEYS}


def _args(node) -> tuple:
    """The positional arguments of a ``_target_`` node (Hydra's ``_args_``)."""
    return tuple(node.get("_args_") or ())


def locate(path, key: str):
    """The object a dotted ``path`` names (``pkg.module.attr``); one ``ValueError`` line naming ``key`` if none."""
    if not isinstance(path, str) or "." not in path.strip("."):
        raise ValueError(f"{key} must be a dotted path pkg.module.name, got {path!r}")
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            missing = bool(e.name) and f"{module_name}.".startswith(f"{e.name}.")
            if missing and i > 1:
                continue  # not a module: try a shorter prefix (pkg.module.Class.method)
            if missing:
                raise ValueError(f"{key}={path}: cannot import module {module_name!r} ({type(e).__name__}: {e}); is "
                                 "it installed, or on PYTHONPATH / in the working directory?") from None
            raise ValueError(f"{key}={path}: importing module {module_name!r} failed ({type(e).__name__}: {e})") \
                from None
        except Exception as e:  # the module exists but importing it fails
            raise ValueError(f"{key}={path}: importing module {module_name!r} failed ({type(e).__name__}: "
                             f"{' '.join(str(e).split())})") from None
        for j, attr in enumerate(parts[i:], start=i):
            if not hasattr(obj, attr):
                raise ValueError(f"{key}={path}: module {'.'.join(parts[:j])!r} has no attribute {attr!r}")
            obj = getattr(obj, attr)
        return obj
    raise AssertionError("unreachable")


def _signature(fn) -> str:
    try:
        return f"{getattr(fn, '__qualname__', type(fn).__name__)}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return repr(fn)


def check_arguments(fn, args: tuple, kwargs: dict, key: str, path: str) -> None:
    """``fn(*args, **kwargs)`` binds; else one line naming the bad keys (``key.NAME``) and ``fn``'s signature."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: let the call speak
    params = signature.parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in kwargs if k not in params or params[k].kind is inspect.Parameter.POSITIONAL_ONLY]
        if unknown:
            raise ValueError(f"{', '.join(f'{key}.{k}' for k in unknown)}: not an argument of {path}; it takes "
                             f"{_signature(fn)}")
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"{key}._target_={path} cannot be called with {key}.* = {kwargs}: {e}; it takes "
                         f"{_signature(fn)}") from None


def build_model(cfg) -> nn.Module:
    """The configured model on CPU: the reference GPT, or ``hydra.utils.instantiate(cfg.model)``."""
    target = user_target(cfg.model)
    if target is None:
        return GPT(GPTConfig.from_config(cfg.model))
    from hydra.utils import instantiate

    locate(target, "model._target_")
    node = {k: v for k, v in cfg.model.items() if k not in RUN_KEYS}
    try:
        model = instantiate(node, _convert_="all")
    except Exception as e:
        cause = e.__cause__ or e
        raise ValueError(f"model._target_={target} raised {type(cause).__name__}: {' '.join(str(cause).split())}") \
            from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model._target_={target} returned {type(model).__name__} ({_short(model)}), not a "
                         "torch.nn.Module; return the model from the factory")
    return model


def build_model_shapes(cfg) -> nn.Module:
    """The configured model for shape and layout checks: built on the meta device (no memory, no initialisation
    cost), or on CPU for a factory that cannot build there; the RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                return build_model(cfg)
        except Exception:  # a user's model that computes on its weights in __init__
            return build_model(cfg)


def build_loss(cfg) -> Callable:
    """``(model, batch) -> (loss_sum, n_valid)``: ``train.loss._target_`` with its keyword arguments bound, or
    ``model_io.forward_loss_sum``."""
    node = cfg.train.loss
    if node is None:
        return forward_loss_sum
    if not hasattr(node, "get") or not node.get("_target_"):
        raise ValueError(f"train.loss must be null (cross-entropy on the model's logits) or name your function: "
                         f"train.loss._target_=pkg.module.fn, got {_short(node)}")
    fn = locate(node.get("_target_"), "train.loss._target_")
    if not callable(fn):
        raise ValueError(f"train.loss._target_={node.get('_target_')} is {_short(fn)} (type {type(fn).__name__}), "
                         "not a function")
    kwargs = _kwargs(node)
    return partial(fn, **kwargs) if kwargs else fn


def context_length(model: nn.Module) -> tuple[int | None, str | None]:
    """``(longest sequence the model takes, where that was read)``, or ``(None, None)`` when it does not say."""
    for holder in CONFIG_ATTRS:
        obj = getattr(model, holder, None) if holder else model
        for attr in CONTEXT_ATTRS:
            value = getattr(obj, attr, None) if obj is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, ".".join(p for p in (type(model).__name__, holder, attr) if p)
    return None, None


def input_vocab(model: nn.Module) -> tuple[int | None, str | None]:
    """Token ids the model embeds: ``get_input_embeddings()`` (Hugging Face) or the first ``nn.Embedding``."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except Exception:  # a model whose method is not implemented
        embedding = None
    if not isinstance(embedding, nn.Embedding):
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is None:
        return None, None
    name = next((n for n, m in model.named_modules() if m is embedding), "")
    return embedding.num_embeddings, f"{name or type(embedding).__name__}.num_embeddings"


def _short(value) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


def _ids(vocab: int) -> str:
    return "the data are bytes (token ids 0..255)" if vocab == VOCAB else \
        f"the data's token ids are 0..{vocab - 1} (data.tokenizer)"


def _dry_run(model: nn.Module, loss_fn, name: str, loss_path: str | None, vocab: int = VOCAB) -> None:
    """One forward (and loss) on a 1 x 2 batch holding the largest token id: every way it fails is one line."""
    x = torch.tensor([[vocab - 1, 0]])
    batch = (x, torch.tensor([[0, vocab - 1]]))
    shape = f"the pair (x, y), x int64 of shape (1, 2) with ids 0..{vocab - 1}"
    with torch.no_grad():
        if loss_path is not None:
            try:
                result = loss_fn(model, batch)
                ok = isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], torch.Tensor) \
                    and result[0].numel() == 1
            except Exception as e:
                raise ValueError(f"train.loss._target_={loss_path} cannot take the batch ({shape}) for {name}: "
                                 f"{type(e).__name__}: {' '.join(str(e).split())}; the model's forward is "
                                 f"{_signature(model.forward)}") from None
            if not ok:
                raise ValueError(f"train.loss._target_={loss_path} returned {_short(result)}; it must return "
                                 "(loss_sum, n_valid): a scalar tensor and the count of targets != -100")
            return
        try:
            logits = logits_of(forward(model, batch))
        except Exception as e:
            raise ValueError(f"{name}: the forward cannot take the batch ({shape}, called as model(x)): "
                             f"{type(e).__name__}: {' '.join(str(e).split())}; forward is "
                             f"{_signature(model.forward)}; name a loss that calls it your way: "
                             "train.loss._target_=pkg.module.fn") from None
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (1, 2):
            raise ValueError(f"{name}: model(x) on x of shape (1, 2) returned logits of shape {tuple(logits.shape)}; "
                             "need (batch, seq, vocab) with one prediction per position, or name a loss: "
                             "train.loss._target_=pkg.module.fn")
        if logits.shape[-1] < vocab:
            raise ValueError(f"{name}: its logits have {logits.shape[-1]} classes; {_ids(vocab)}: build it with a "
                             f"vocab_size >= {vocab}")
        forward_loss_sum(model, batch)


def check_model(cfg, vocab: int = VOCAB) -> ModelInfo:
    """Every error the configured model (and ``train.loss``) would raise in ``train`` or a bench, found in one
    process; returns what ``validate`` checks ``train.seq_len`` and the pipeline split against. ``vocab``: the
    tokenizer's id count (``data.tokenizer``; 256 for bytes), which the model must embed."""
    target, loss_node = user_target(cfg.model), cfg.train.loss
    loss_path = loss_node.get("_target_") if hasattr(loss_node, "get") else None
    if target is None:
        gpt = GPTConfig.from_config(cfg.model)
        info = ModelInfo(model_name(cfg), gpt.block_size, "model.block_size", gpt.n_layer)
        if loss_node is None:
            return info  # the reference GPT with the token loss: nothing to try
    else:
        factory = locate(target, "model._target_")
        if not callable(factory):
            raise ValueError(f"model._target_={target} is {_short(factory)} (type {type(factory).__name__}), not a "
                             "function or class that builds the model")
        check_arguments(factory, _args(cfg.model), _kwargs(cfg.model), "model", target)
    loss_fn = build_loss(cfg)
    if loss_path is not None:
        check_arguments(loss_fn.func if isinstance(loss_fn, partial) else loss_fn, (None, None), _kwargs(loss_node),
                        "train.loss", loss_path)
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg)
    name = model_name(cfg)
    if target is not None:
        embeds, where = input_vocab(model)
        if embeds is not None and embeds < vocab:
            raise ValueError(f"{name} embeds {embeds} token ids ({where}); {_ids(vocab)}: "
                             f"build it with a vocab_size >= {vocab}")
        context, source = context_length(model)
        info = ModelInfo(name, context, source, len(find_blocks(model)))
    _dry_run(model, loss_fn, name, loss_path, vocab)
    return info
