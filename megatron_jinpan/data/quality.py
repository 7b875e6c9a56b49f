"""Corpus quality tools: cleaning/filtering with language stats, exact + near-duplicate removal.

    jinpan data clean --input raw.jsonl --output clean.jsonl --workers 8
    jinpan data dedup --input clean.jsonl --output dedup.jsonl --workers 8

Both stream JSONL line by line (memory does not grow with the input, except
the dedup index: ~1 KB per kept document), work in ordered chunks across
worker processes and keep every other field of each JSON object.

Near duplicates: MinHash over character 5-gram shingles (works for Chinese
and English alike) with `num_perm` 64-bit multiply-shift hash functions,
LSH with `bands` x `rows` bands; band collisions are verified by the
estimated Jaccard similarity >= `threshold`. The first document of a
duplicate group is kept.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np

from .tokenizer import DataError, is_cjk

CHUNK = 512

_WS = re.compile(r"[ \t\u00a0\u3000\u2000-\u200b\ufeff]+")
_NL = re.compile(r"\n{3,}")
_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


# ------------------------------------------------------------------ reading
def _read_chunks(path: str, json_key: str):
    """Yield lists of (lineno, obj, text) in order; bad lines raise DataError with the line number."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--input {path} does not exist; pass a JSONL file with one {{\"{json_key}\": ...}} per line")
    chunk = []
    with open(path, encoding="utf-8") as fh:
        lineno = 0
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(json_key), str):
                    raise DataError(f"{path} line {lineno} has no string {json_key!r} field; pick the field with --json-key")
                chunk.append((lineno, obj, obj[json_key]))
                if len(chunk) >= CHUNK:
                    yield chunk
                    chunk = []
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} line {lineno + 1} is not valid UTF-8 ({exc.reason})") from None
    if chunk:
        yield chunk


def _pool_map(fn, chunks, workers: int):
    if workers > 1:
        # spawn, not fork: forking a process that holds torch/gloo threads can deadlock.
        ctx = mp.get_context("spawn")
        pool = ctx.Pool(workers)
        try:
            yield from pool.imap(fn, chunks, chunksize=1)
        finally:
            pool.terminate()
            pool.join()
    else:
        yield from map(fn, chunks)


class _AtomicWriter:
    def __init__(self, path: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        self.fh = open(self.tmp, "w", encoding="utf-8")

    def write(self, obj: dict) -> None:
        self.fh.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.fh.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------ cleaning
def normalize_text(text: str) -> str:
    """NFKC, drop control characters, collapse runs of spaces, strip lines, at most one blank line."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CTRL.sub("", text)
    lines = [_WS.sub(" ", line).strip() for line in text.split("\n")]
    return _NL.sub("\n\n", "\n".join(lines)).strip()


def language_stats(text: str) -> tuple[int, int, int]:
    """(CJK characters, ASCII letters, non-space characters)."""
    zh = en = total = 0
    for c in text:
        if c.isspace():
            continue
        total += 1
        if is_cjk(c):
            zh += 1
        elif c.isascii() and c.isalpha():
            en += 1
    return zh, en, total


def _clean_chunk(args):
    chunk, opts = args
    out = []
    for lineno, obj, text in chunk:
        clean = normalize_text(text)
        zh, en, total = language_stats(clean)
        reason = None
        if total < opts["min_chars"]:
            reason = "too_short"
        elif total > opts["max_chars"]:
            reason = "too_long"
        else:
            share = {"zh": zh, "en": en}
            kept = sum(share[lang] for lang in opts["langs"])
            if kept / total < opts["min_lang_ratio"]:
                reason = "language"
        out.append((lineno, obj, clean, reason, zh, en, total))
    return out


def clean_jsonl(input_path: str, output_path: str, *, json_key: str = "text", min_chars: int = 10,
                max_chars: int = 1_000_000, langs=("zh", "en"), min_lang_ratio: float = 0.5,
                workers: int = 1, progress: bool = True) -> dict:
    """Normalise and filter documents; returns counts and Chinese/English statistics."""
    from tqdm import tqdm

    langs = tuple(langs)
    bad = [lang for lang in langs if lang not in ("zh", "en")]
    if bad:
        raise DataError(f"--langs {bad[0]} is not supported; choose from zh, en")
    opts = {"min_chars": min_chars, "max_chars": max_chars, "langs": langs, "min_lang_ratio": min_lang_ratio}
    stats = Counter()
    dropped = Counter()
    bar = tqdm(desc=f"clean {Path(input_path).name}", unit="doc", disable=not progress, dynamic_ncols=True)
    chunks = ((c, opts) for c in _read_chunks(input_path, json_key))
    with _AtomicWriter(output_path) as out:
        for results in _pool_map(_clean_chunk, chunks, workers):
            for _lineno, obj, clean, reason, zh, en, total in results:
                stats["documents_in"] += 1
                stats["chars_in"] += len(obj[json_key])
                if reason:
                    dropped[reason] += 1
                    continue
                obj[json_key] = clean
                out.write(obj)
                stats["documents_out"] += 1
                stats["chars_out"] += len(clean)
                stats["zh_chars"] += zh
                stats["en_letters"] += en
                stats["zh_documents" if zh >= en else "en_documents"] += 1
            bar.update(len(results))
    bar.close()
    report = dict(stats)
    for key in ("documents_in", "documents_out", "chars_in", "chars_out", "zh_chars", "en_letters",
                "zh_documents", "en_documents"):
        report.setdefault(key, 0)
    report["dropped"] = {r: dropped.get(r, 0) for r in ("too_short", "too_long", "language")}
    letters = report["zh_chars"] + report["en_letters"]
    report["zh_share_chars"] = round(report["zh_chars"] / letters, 4) if letters else 0.0
    docs = report["zh_documents"] + report["en_documents"]
    report["zh_share_documents"] = round(report["zh_documents"] / docs, 4) if docs else 0.0
    report["zh_en_document_ratio"] = (f"{report['zh_documents']}:{report['en_documents']}")
    return report


# ------------------------------------------------------------------ dedup
_MASK61 = (1 << 61) - 1


def exact_key(text: str) -> bytes:
    """Hash of the text with case and whitespace differences removed."""
    norm = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest()


def _hash_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, np.iinfo(np.int64).max, size=num_perm, dtype=np.int64).astype(np.uint64) | np.uint64(1)
    b = rng.integers(0, np.iinfo(np.int64).max, size=num_perm, dtype=np.int64).astype(np.uint64)
    return a, b


def shingle_hashes(text: str, n: int = 5) -> np.ndarray:
    """64-bit hashes of the character n-grams of the whitespace-normalised, lowercased text."""
    norm = " ".join(text.lower().split())
    cps = np.frombuffer(norm.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(cps) < n:
        cps = np.concatenate([cps, np.zeros(n - len(cps), dtype=np.uint64)])
    h = np.full(len(cps) - n + 1, 0xCBF29CE484222325, dtype=np.uint64)
    prime = np.uint64(0x100000001B3)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = (h ^ cps[j:len(cps) - n + 1 + j]) * prime
        h ^= h >> np.uint64(29)
    return np.unique(h)


def minhash(text: str, a: np.ndarray, b: np.ndarray, n: int = 5) -> np.ndarray:
    """MinHash signature (uint32 per permutation) of a text."""
    sh = shingle_hashes(text, n)
    with np.errstate(over="ignore"):
        vals = (sh[None, :] * a[:, None] + b[:, None]) >> np.uint64(32)
    return vals.min(axis=1).astype(np.uint32)


def _dedup_chunk(args):
    chunk, opts = args
    a, b = _hash_params(opts["num_perm"], opts["seed"])
    out = []
    for lineno, obj, text in chunk:
        out.append((lineno, obj, exact_key(text), minhash(text, a, b, opts["ngram"])))
    return out


def dedup_jsonl(input_path: str, output_path: str, *, json_key: str = "text", threshold: float = 0.8,
                num_perm: int = 128, bands: int = 16, ngram: int = 5, seed: int = 1, workers: int = 1,
                progress: bool = True, exact_only: bool = False) -> dict:
    """Remove exact and near duplicates (first occurrence kept); returns counts."""
    from tqdm import tqdm

    if num_perm % bands:
        raise DataError(f"--num-perm {num_perm} must be divisible by --bands {bands}")
    if not 0 < threshold <= 1:
        raise DataError(f"--threshold {threshold} must be in (0, 1]")
    rows = num_perm // bands
    opts = {"num_perm": num_perm, "seed": seed, "ngram": ngram}
    seen_exact: set[bytes] = set()
    tables: list[dict[bytes, int]] = [dict() for _ in range(bands)]
    signatures: list[np.ndarray] = []
    counts = Counter()
    bar = tqdm(desc=f"dedup {Path(input_path).name}", unit="doc", disable=not progress, dynamic_ncols=True)
    chunks = ((c, opts) for c in _read_chunks(input_path, json_key))
    with _AtomicWriter(output_path) as out:
        for results in _pool_map(_dedup_chunk, chunks, workers):
            for _lineno, obj, key, sig in results:
                counts["documents_in"] += 1
                if key in seen_exact:
                    counts["exact_duplicates"] += 1
                    continue
                seen_exact.add(key)
                if not exact_only:
                    band_keys = [sig[i * rows:(i + 1) * rows].tobytes() for i in range(bands)]
                    candidates = {tables[i][k] for i, k in enumerate(band_keys) if k in tables[i]}
                    if any(float(np.mean(signatures[c] == sig)) >= threshold for c in candidates):
                        counts["near_duplicates"] += 1
                        continue
                    doc_id = len(signatures)
                    signatures.append(sig)
                    for i, k in enumerate(band_keys):
                        tables[i].setdefault(k, doc_id)
                out.write(obj)
                counts["documents_out"] += 1
            bar.update(len(results))
    bar.close()
    report = {k: counts.get(k, 0) for k in ("documents_in", "documents_out", "exact_duplicates", "near_duplicates")}
    report.update(threshold=threshold, num_perm=num_perm, bands=bands, rows=rows, ngram=ngram)
    return report
