"""Tokenizers: train a LLaMA-style sentencepiece BPE model, extend it with new
pieces without moving existing ids, and load any tokenizer we accept.

    from megatron_jinpan.data.tokenizer import load_tokenizer, train_tokenizer, extend_tokenizer
    tok = load_tokenizer("data/demo/tokenizer.model")
    ids = tok.encode("营业收入 grew 12%")

Ids follow LLaMA: unk=0, bos=1, eos=2, no pad piece. `load_tokenizer` also
accepts a Hugging Face tokenizer directory (e.g. an extended LLaMA).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path

from ..config import ConfigError

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


class DataError(ConfigError):
    """Bad user input to a data command; the message names the fix."""


def is_cjk(ch: str) -> bool:
    """True for a CJK unified ideograph (the Chinese characters we count and add)."""
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0xF900 <= cp <= 0xFAFF)


class Tokenizer:
    """Thin wrapper with one interface over sentencepiece and Hugging Face tokenizers."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        p = Path(path)
        if p.is_dir():
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(p))
            self._sp = None
            self.vocab_size = len(self._hf)
            self.bos_id = self._hf.bos_token_id if self._hf.bos_token_id is not None else -1
            self.eos_id = self._hf.eos_token_id if self._hf.eos_token_id is not None else -1
        else:
            import sentencepiece as spm

            self._hf = None
            self._sp = spm.SentencePieceProcessor(model_file=str(p))
            self.vocab_size = self._sp.get_piece_size()
            self.bos_id = self._sp.bos_id()
            self.eos_id = self._sp.eos_id()

    @property
    def eod(self) -> int:
        return self.eos_id

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._sp is not None:
            return self._sp.encode(texts)
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids)


def load_tokenizer(path: str | os.PathLike | None, key: str = "data.tokenizer") -> Tokenizer:
    if not path:
        raise ConfigError(f"{key} is not set; point it at a sentencepiece .model file "
                          "(make one with `jinpan tokenizer train` or `jinpan data demo`)")
    if not Path(path).exists():
        raise FileNotFoundError(f"{key}={path} does not exist; train one with `jinpan tokenizer train` "
                                "or run `jinpan data demo`")
    try:
        return Tokenizer(path)
    except Exception as exc:  # noqa: BLE001 - sentencepiece raises bare RuntimeError/OSError
        raise ConfigError(f"{key}={path} is not a sentencepiece model or Hugging Face tokenizer dir ({exc})") from None


# ------------------------------------------------------------------ training
def train_tokenizer(input_path: str | os.PathLike, vocab_size: int, output: str | os.PathLike,
                    *, character_coverage: float = 0.9995, input_sentence_size: int = 2_000_000,
                    num_threads: int | None = None, quiet: bool = True) -> Path:
    """Train a LLaMA-style BPE model (byte fallback, split digits, unk=0 bos=1 eos=2)."""
    import sentencepiece as spm

    inputs = [str(p) for p in (input_path if isinstance(input_path, (list, tuple)) else [input_path])]
    for p in inputs:
        if not Path(p).is_file():
            raise FileNotFoundError(f"--input {p} does not exist; pass a UTF-8 text file, one sentence or document per line")
        if Path(p).stat().st_size == 0:
            raise DataError(f"--input {p} is empty; pass a text file with training text")
    if vocab_size < 300:
        raise DataError(f"--vocab-size {vocab_size} is too small: byte fallback alone needs 259 pieces; use >= 300")
    output = Path(output)
    if output.suffix != ".model":
        raise DataError(f"--output {output} must end in .model")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        prefix = os.path.join(tmp, "spm")
        try:
            spm.SentencePieceTrainer.train(
                input=",".join(inputs), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
                byte_fallback=True, split_digits=True, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
                character_coverage=character_coverage, normalization_rule_name="identity",
                add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
                max_sentence_length=16384, num_threads=num_threads or min(16, os.cpu_count() or 1),
                train_extremely_large_corpus=False, minloglevel=2 if quiet else 0,
                hard_vocab_limit=False,
            )
        except RuntimeError as exc:
            raise DataError(f"sentencepiece training failed: {exc}; try a smaller --vocab-size or more text") from None
        shutil.move(prefix + ".model", output)
        shutil.move(prefix + ".vocab", output.with_suffix(".vocab"))
    return output


# ------------------------------------------------------------------ extension
def tokens_per_char(tok: Tokenizer, texts: list[str]) -> float:
    """Tokens per non-space character over `texts`."""
    chars = sum(sum(1 for c in t if not c.isspace()) for t in texts)
    tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    return tokens / max(chars, 1)


def read_chars_file(path: str | os.PathLike) -> list[str]:
    """A --chars file: one piece per line (a character or a word); lines may also be runs of characters
    separated by nothing, in which case each CJK character is a piece. '#' lines are comments."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--chars {path} does not exist; pass a UTF-8 file with one character or word per line")
    pieces: list[str] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word = line.split()[0] if "\t" in line or " " in line else line
        if len(word) > 16 and all(is_cjk(c) for c in word):
            pieces.extend(word)  # a run of characters
        else:
            pieces.append(word)
    return pieces


def frequent_cjk_chars(corpus: str | os.PathLike, num_chars: int, max_bytes: int | None = 2_000_000_000) -> list[str]:
    """The `num_chars` most frequent CJK characters of a text corpus (ties broken by code point)."""
    if not Path(corpus).is_file():
        raise FileNotFoundError(f"--corpus {corpus} does not exist; pass a UTF-8 text file")
    counts: Counter = Counter()
    read = 0
    with open(corpus, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            counts.update(c for c in line if is_cjk(c))
            read += len(line)
            if max_bytes and read > max_bytes:
                break
    return [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:num_chars]]


def extend_tokenizer(base: str | os.PathLike, pieces: list[str], output: str | os.PathLike,
                     score: float = 0.0) -> dict:
    """Append `pieces` missing from `base` as NORMAL pieces; existing ids are untouched.

    Returns {"base_vocab", "added", "new_vocab", "skipped"}.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    if not Path(base).is_file():
        raise FileNotFoundError(f"--base {base} does not exist; pass a sentencepiece .model file")
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(Path(base).read_bytes())
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"--base {base} is not a sentencepiece model ({exc})") from None
    existing = {p.piece for p in proto.pieces}
    base_vocab = len(proto.pieces)
    added, skipped = [], 0
    for piece in pieces:
        piece = unicodedata.normalize("NFKC", piece).strip()
        if not piece or piece in existing:
            skipped += 1
            continue
        new = pb.ModelProto.SentencePiece()
        new.piece = piece
        new.score = score
        new.type = pb.ModelProto.SentencePiece.Type.NORMAL
        proto.pieces.append(new)
        existing.add(piece)
        added.append(piece)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_bytes(proto.SerializeToString())
    os.replace(tmp, output)
    return {"base_vocab": base_vocab, "added": len(added), "new_vocab": len(proto.pieces), "skipped": skipped}
