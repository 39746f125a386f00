"""Export to and import from Hugging Face: ``python -m curry_train export checkpoint.dir=DIR --out HF_DIR`` and
``model.init_from=HF_DIR``.

Export (``export``): the run's newest intact checkpoint (``sample.load_run``: any world size) as a folder
``transformers`` loads with ``GPT2LMHeadModel.from_pretrained`` / ``AutoModelForCausalLM``: ``config.json``
(``gpt2_config``), ``model.safetensors`` (``gpt_to_hf``) and the run's tokenizer (``tokenizer.json`` +
``tokenizer_config.json``; ``bytes`` as an equivalent byte-level tokenizer, id = byte). Writing needs only
``safetensors``, not ``transformers``. A ``model._target_`` model with ``save_pretrained`` (a Hugging Face model)
is saved through it. The reference GPT maps one to one onto GPT-2: exact GELU (``activation_function="gelu"``),
LayerNorm eps 1e-5, learned positions, tied head (``tie_word_embeddings``); GPT-2's ``Conv1D`` weights are our
``Linear`` weights transposed, and our fused ``attn.qkv`` rows, ordered per head (``(n_head, 3, head_dim)``), are
reordered to GPT-2's ``c_attn`` ``[q; k; v]`` (``(3, n_head, head_dim)``). A mixture-of-experts GPT has no GPT-2
form and is refused with one line.

Import (``init_from(model, cfg)``, called by ``train`` before the model is parallelized): the weights of
``model.init_from`` (a GPT-2 folder: ``config.json`` + ``model.safetensors``; the keys with or without the
``transformer.`` prefix) into the reference GPT, after checking that the folder's shape equals ``model.*`` (one line
naming the key to set); for a ``model._target_`` model, its ``state_dict`` keys loaded from the folder's safetensors
(a tied head may be absent; a missing, unexpected or differently shaped weight is one line).
A checkpoint being resumed is loaded after it and wins.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .tokenizer import BYTES, atomic_write, byte_level_alphabet, byte_tokenizer_json, tokenizer_file
from .tokenizer import write_hf_tokenizer

WEIGHTS = "model.safetensors"
# GPT-2 name -> (our name, transposed): Conv1D weights are (in, out), our Linear weights (out, in)
LAYER = {"ln_1.weight": ("ln1.weight", False), "ln_1.bias": ("ln1.bias", False),
         "ln_2.weight": ("ln2.weight", False), "ln_2.bias": ("ln2.bias", False),
         "attn.c_proj.weight": ("attn.proj.weight", True), "attn.c_proj.bias": ("attn.proj.bias", False),
         "mlp.c_fc.weight": ("mlp.fc.weight", True), "mlp.c_fc.bias": ("mlp.fc.bias", False),
         "mlp.c_proj.weight": ("mlp.proj.weight", True), "mlp.c_proj.bias": ("mlp.proj.bias", False)}
TOP = {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight", "ln_f.weight": "ln_f.weight",
       "ln_f.bias": "ln_f.bias"}


def _qkv_to_gpt2(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows ``(n_head, 3, head_dim)`` -> ``(3, n_head, head_dim)`` (``[q; k; v]``), any trailing dims kept."""
    rest = t.shape[1:]
    return t.reshape(n_head, 3, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def _qkv_from_gpt2(t: torch.Tensor, n_head: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(3, n_head, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def gpt_to_hf(model) -> dict[str, torch.Tensor]:
    """The reference GPT's weights under ``GPT2LMHeadModel``'s names (the tied head left out)."""
    cfg, sd = model.cfg, model.state_dict()
    out = {f"transformer.{hf}": sd[ours] for hf, ours in TOP.items()}
    for i in range(cfg.n_layer):
        for hf, (ours, transpose) in LAYER.items():
            t = sd[f"blocks.{i}.{ours}"]
            out[f"transformer.h.{i}.{hf}"] = t.t() if transpose else t
        out[f"transformer.h.{i}.attn.c_attn.weight"] = _qkv_to_gpt2(sd[f"blocks.{i}.attn.qkv.weight"], cfg.n_head).t()
        out[f"transformer.h.{i}.attn.c_attn.bias"] = _qkv_to_gpt2(sd[f"blocks.{i}.attn.qkv.bias"], cfg.n_head)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def hf_to_gpt(hf: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """``gpt_to_hf`` inverted: GPT-2 names (with or without ``transformer.``) -> the reference GPT's state dict."""
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    sd = {ours: hf[name] for name, ours in TOP.items()}
    for i in range(cfg.n_layer):
        for name, (ours, transpose) in LAYER.items():
            t = hf[f"h.{i}.{name}"]
            sd[f"blocks.{i}.{ours}"] = t.t() if transpose else t
        sd[f"blocks.{i}.attn.qkv.weight"] = _qkv_from_gpt2(hf[f"h.{i}.attn.c_attn.weight"].t(), cfg.n_head)
        sd[f"blocks.{i}.attn.qkv.bias"] = _qkv_from_gpt2(hf[f"h.{i}.attn.c_attn.bias"], cfg.n_head)
    sd["head.weight"] = hf.get("lm_head.weight", sd["tok_emb.weight"])
    return {k: v.contiguous() for k, v in sd.items()}


def gpt2_config(cfg, eot_id: int | None) -> dict:
    """``config.json`` of the ``GPT2LMHeadModel`` equal to the reference GPT ``cfg`` (a ``GPTConfig``)."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": cfg.mlp_ratio * cfg.n_embd, "activation_function": "gelu",
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "tie_word_embeddings": bool(cfg.tie_embeddings), "bos_token_id": eot_id, "eos_token_id": eot_id,
        "torch_dtype": "float32",
    }


SHAPE_KEYS = {"vocab_size": "vocab_size", "n_positions": "block_size", "n_embd": "n_embd", "n_layer": "n_layer",
              "n_head": "n_head"}


def _save_tokenizer(tokenizer, out: Path, block: int | None) -> None:
    if tokenizer.kind == BYTES:
        write_hf_tokenizer(byte_tokenizer_json(), out, byte_level_alphabet()[tokenizer.eot_id], block)
    else:
        eot = tokenizer.tok.id_to_token(tokenizer.eot_id) if tokenizer.eot_id is not None else None
        write_hf_tokenizer(tokenizer_file(tokenizer.spec).read_text(encoding="utf-8"), out, eot, block)


def export(checkpoint_dir, out_dir, overrides: list[str] | None = None) -> tuple[Path, dict]:
    """Write the run's newest intact checkpoint to ``out_dir`` as a Hugging Face model folder; returns
    ``(out_dir, checkpoint meta)``."""
    from .model import GPT
    from .sample import block_size, load_run
    from .user_model import user_target

    cfg, model, tokenizer, meta = load_run(checkpoint_dir, overrides)
    out = Path(str(out_dir)).expanduser()
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise FileExistsError(f"--out {out_dir}: already holds files; give a new or empty folder")
    if isinstance(model, GPT):
        if model.cfg.moe_experts:
            raise ValueError(f"model.moe_experts={model.cfg.moe_experts}: GPT-2 has no mixture of experts; export "
                             "takes the dense reference GPT (or a model._target_ with save_pretrained)")
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{WEIGHTS}.tmp"
        save_file(gpt_to_hf(model), str(tmp), metadata={"format": "pt"})
        tmp.replace(out / WEIGHTS)
        atomic_write(out / "config.json", json.dumps(gpt2_config(model.cfg, tokenizer.eot_id), indent=2) + "\n")
    elif hasattr(model, "save_pretrained"):
        model.save_pretrained(str(out))
    else:
        raise ValueError(f"model._target_={user_target(cfg.model)}: {type(model).__name__} has no save_pretrained "
                         "and is not the reference GPT: nothing here knows its Hugging Face form")
    _save_tokenizer(tokenizer, out, block_size(model))
    return out, meta


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model.init_from={str(folder)!r}: no *.safetensors file there")
    weights = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def init_from(model, cfg):
    """Load ``model.init_from``'s weights into ``model`` (see the module docstring); returns ``model``."""
    from .model import GPT

    source = cfg.model.get("init_from")
    if source is None:
        return model
    folder = Path(str(source)).expanduser()
    weights = _read_weights(folder)
    if isinstance(model, GPT):
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        for theirs, ours in SHAPE_KEYS.items():
            if theirs in config and config[theirs] != getattr(model.cfg, ours):
                raise ValueError(f"model.init_from={source!r} has {theirs}={config[theirs]}, the model "
                                 f"model.{ours}={getattr(model.cfg, ours)}: set model.{ours}={config[theirs]}")
        try:
            state = hf_to_gpt(weights, model.cfg)
        except KeyError as e:
            raise ValueError(f"model.init_from={source!r}: no weight {e.args[0]!r}: not a GPT-2 model folder") \
                from None
        model.load_state_dict(state, strict=True)
        return model
    own = model.state_dict()
    missing = [k for k in own if k not in weights and not _tied(model, k)]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise ValueError(f"model.init_from={source!r} does not fit {type(model).__name__}: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
    for key, value in weights.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"model.init_from={source!r} does not fit {type(model).__name__}: {key} has shape "
                             f"{tuple(value.shape)} in model.init_from, {tuple(own[key].shape)} in the model")
    model.load_state_dict(weights, strict=False)
    return model


def _tied(model, key: str) -> bool:
    """A state-dict entry that shares its storage with another (a tied head)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(key)
    return p is not None and any(q is p and k != key for k, q in params.items())
