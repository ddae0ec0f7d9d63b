"""Text tokenizers for the VLA: a word-level vocabulary built from the task instructions (no download), or a
real HF tokenizer when a checkpoint directory brings one.

The word vocabulary is tiny (tens of words for LIBERO-Object + Lift) and saved next to the weights as
`vla_tokenizer.json` (a distinct name so it never clashes with a HF `tokenizer.json`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Protocol

from vla_runtime.errors import UserError

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
SPECIALS = (PAD, BOS, UNK)
TOKENIZER_FILE = "vla_tokenizer.json"
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class TextTokenizer(Protocol):
    pad_id: int
    bos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS (the model places BOS itself)."""

    def decode(self, ids: Iterable[int]) -> str: ...


def normalize(text: str) -> str:
    """The canonical form the word tokenizer round-trips: lowercase words/punctuation joined by single spaces."""
    return " ".join(_WORD.findall(text.lower()))


class WordTokenizer:
    """Lowercase word-level tokenizer; unknown words map to <unk> (so a new instruction still runs)."""

    def __init__(self, words: Iterable[str]) -> None:
        vocab = list(SPECIALS) + sorted(set(words) - set(SPECIALS))
        self.itos = vocab
        self.stoi = {w: i for i, w in enumerate(vocab)}
        self.pad_id, self.bos_id, self.unk_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @staticmethod
    def from_instructions(instructions: Iterable[str]) -> "WordTokenizer":
        words: set[str] = set()
        for s in instructions:
            words.update(_WORD.findall(s.lower()))
        return WordTokenizer(words)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, self.unk_id) for w in _WORD.findall(text.lower())]

    def unknown_words(self, text: str) -> list[str]:
        """The words of text that encode() maps to <unk>."""
        return [w for w in _WORD.findall(text.lower()) if w not in self.stoi]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return " ".join(out)

    def save(self, ckpt_dir: str | Path) -> Path:
        p = Path(ckpt_dir) / TOKENIZER_FILE
        p.write_text(json.dumps({"type": "word", "vocab": self.itos}, indent=0))
        return p

    @staticmethod
    def load(path: str | Path) -> "WordTokenizer":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read tokenizer {p}: {e}") from None
        if d.get("type") != "word" or list(d.get("vocab", [])[:3]) != list(SPECIALS):
            raise UserError(f"{p} is not a VLA word tokenizer file")
        tok = WordTokenizer([])
        tok.itos = list(d["vocab"])
        tok.stoi = {w: i for i, w in enumerate(tok.itos)}
        return tok


class HFTokenizer:
    """Adapter over a local `transformers` tokenizer (a real checkpoint's own vocabulary)."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        declared = ""
        tc = Path(path) / "tokenizer_config.json"
        if tc.is_file():
            declared = str(json.loads(tc.read_text()).get("tokenizer_class", ""))
        # a generic tokenizer.json must not be re-interpreted by the model family's tokenizer class
        cls = PreTrainedTokenizerFast if declared in ("TokenizersBackend", "PreTrainedTokenizerFast") else AutoTokenizer
        try:
            self.tok = cls.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the tokenizer in {path}: {e}") from None
        self.bos_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else 0
        pad = self.tok.pad_token_id
        self.pad_id = pad if pad is not None else (self.tok.eos_token_id if self.tok.eos_token_id is not None else 0)
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Iterable[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=True))


def has_hf_tokenizer(ckpt_dir: str | Path) -> bool:
    d = Path(ckpt_dir)
    return (d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file() or (
        d / "tokenizer_config.json").is_file()


def load_tokenizer(ckpt_dir: str | Path) -> WordTokenizer | HFTokenizer:
    """The checkpoint's own word vocabulary if present, else its HF tokenizer files."""
    d = Path(ckpt_dir)
    if (d / TOKENIZER_FILE).is_file():
        return WordTokenizer.load(d / TOKENIZER_FILE)
    if has_hf_tokenizer(d):
        return HFTokenizer(d)
    raise UserError(f"{d} has no tokenizer ({TOKENIZER_FILE} or HF tokenizer files)")
