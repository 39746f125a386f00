"""Tokenizers: raw bytes (the default), a local Hugging Face tokenizer, or a byte-level BPE trained here.

``data.tokenizer`` names one:

* ``bytes``: token id = byte value (vocab 256); the end-of-text id between prepared documents is 0 (the NUL byte,
  which text never holds). Needs no library.
* a ``tokenizer.json`` file, or a folder holding one (a Hugging Face tokenizer directory): loaded with the
  ``tokenizers`` library from local disk, never from the hub. Its end-of-text token is the first of ``EOT_NAMES``
  it has (``tokenizer_config.json``'s ``eos_token`` first, when the folder has one).

``load_tokenizer(spec)`` returns a ``Tokenizer``: ``encode(text) -> list[int]``, ``encode_batch(texts)``,
``decode(ids)``, ``vocab_size``, ``eot_id`` and ``identity`` (``{"kind", "vocab_size", "sha256"}``: the hash of
the tokenizer's JSON, so prepared shards written by another tokenizer are refused, ``prepared_data``).

``train_bpe(texts, vocab_size, out_dir)`` (``python -m curry_train tokenizer --vocab-size N --out DIR``) trains a
byte-level BPE (GPT-2's pre-tokenizer and byte alphabet, so every string encodes, no unknown token) with
``<|endoftext|>`` as id 0, offline, and saves it in the Hugging Face format (``tokenizer.json`` +
``tokenizer_config.json``: ``transformers.AutoTokenizer.from_pretrained(DIR)`` loads it).
``byte_tokenizer_json()`` is the ``bytes`` tokenizer in that format (an export needs one).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

BYTES = "bytes"
BYTE_EOT = 0  # the NUL byte: never in text
EOT_TOKEN = "<|endoftext|>"
EOT_NAMES = (EOT_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


class ByteTokenizer:
    """Token id = byte value; ``decode`` replaces invalid UTF-8 (a sample may stop mid-character)."""

    kind = BYTES
    vocab_size = 256
    eot_id = BYTE_EOT

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    @property
    def identity(self) -> dict:
        return {"kind": BYTES, "vocab_size": 256, "sha256": None}

    def __repr__(self) -> str:
        return "bytes (vocab 256)"


class HFTokenizer:
    """A local ``tokenizer.json`` through the ``tokenizers`` library."""

    kind = "huggingface"

    def __init__(self, path: Path, spec: str):
        from tokenizers import Tokenizer

        self.path, self.spec = path, spec
        self.json_text = path.read_text(encoding="utf-8")
        try:
            self.tok = Tokenizer.from_str(self.json_text)
        except Exception as e:
            raise ValueError(f"data.tokenizer={spec!r}: {path} is not a tokenizers JSON file "
                             f"({' '.join(str(e).split())[:160]})") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eot_id = self._find_eot(path.parent / CONFIG_FILE)
        self.sha256 = hashlib.sha256(self.json_text.encode()).hexdigest()

    def _find_eot(self, config: Path) -> int | None:
        names = list(EOT_NAMES)
        if config.is_file():
            eos = json.loads(config.read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str):
                names.insert(0, eos)
        return next((self.tok.token_to_id(n) for n in names if self.tok.token_to_id(n) is not None), None)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def identity(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "sha256": self.sha256}

    def __repr__(self) -> str:
        return f"{self.path} (vocab {self.vocab_size})"


def tokenizer_file(spec) -> Path:
    """The ``tokenizer.json`` that ``data.tokenizer=spec`` names (a file, or a folder holding one)."""
    p = Path(str(spec)).expanduser()
    if p.is_dir():
        p = p / TOKENIZER_FILE
        if not p.is_file():
            raise FileNotFoundError(f"data.tokenizer={spec!r}: the folder has no {TOKENIZER_FILE} (give a Hugging Face "
                                    "tokenizer folder or file; `python -m curry_train tokenizer` makes one)")
    elif not p.is_file():
        raise FileNotFoundError(f"data.tokenizer={spec!r}: no such file or folder (bytes, a tokenizer.json, or a "
                                "tokenizer folder; never a hub name: nothing is downloaded)")
    return p


def load_tokenizer(spec=None):
    """``bytes`` (or None) -> ``ByteTokenizer``; a path -> ``HFTokenizer``; else one ``ValueError`` line."""
    if spec is None or str(spec) == BYTES:
        return ByteTokenizer()
    return HFTokenizer(tokenizer_file(spec), str(spec))


def check_vocab(model_vocab: int | None, tokenizer, where: str = "model.vocab_size") -> None:
    """The model must embed every id the tokenizer gives: one line naming both when it does not."""
    if model_vocab is not None and model_vocab < tokenizer.vocab_size:
        raise ValueError(f"{where}={model_vocab} is smaller than the tokenizer's {tokenizer.vocab_size} ids "
                         f"(data.tokenizer={getattr(tokenizer, 'spec', BYTES)}); set model.vocab_size="
                         f"{tokenizer.vocab_size} (or larger)")


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer_json() -> str:
    """The ``bytes`` tokenizer as a Hugging Face ``tokenizer.json``: byte ``b`` -> id ``b`` (no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: b for b, c in byte_level_alphabet().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def write_hf_tokenizer(tokenizer_json: str, out_dir: Path, eot: str | None, max_length: int | None = None) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` (a ``PreTrainedTokenizerFast``), each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if eot is not None:
        config.update(eos_token=eot, bos_token=eot, unk_token=eot)
    if max_length is not None:
        config["model_max_length"] = max_length
    atomic_write(out_dir / TOKENIZER_FILE, tokenizer_json)
    atomic_write(out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def train_bpe(texts, vocab_size: int, out_dir, min_frequency: int = 2) -> "HFTokenizer":
    """Train a byte-level BPE of ``vocab_size`` ids (``<|endoftext|>`` = 0, then the 256 bytes, then merges) on the
    strings ``texts`` yields; save it to ``out_dir`` in the Hugging Face format; return it loaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .primitives._checks import integer

    integer("--vocab-size", vocab_size, 257, 2**31 - 1, "(256 bytes + <|endoftext|> at least)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(str(out_dir)).expanduser()
    write_hf_tokenizer(tok.to_str(), out, EOT_TOKEN)
    return HFTokenizer(out / TOKENIZER_FILE, str(out))
