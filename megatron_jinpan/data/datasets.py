"""Training and evaluation data for the trainer.

    from megatron_jinpan.data import build_train_data, build_eval_data, check_tokenizer
    check_tokenizer(cfg)
    train = build_train_data(cfg)
    for mb in train.microbatches(step, dp_rank, dp_size): ...
    evals = build_eval_data(cfg)          # {name: data}; data.microbatches(i, dp_rank, dp_size)

Order contract: step t uses global samples [t*GB, (t+1)*GB); DP rank r takes
the contiguous slice [r*GB/dp, (r+1)*GB/dp) and cuts it into micro-batches
of `train.micro_batch`. Samples depend only on (cfg, t): nothing is carried
from call to call except memoised, recomputable indices.

Each micro-batch is a dict of CPU tensors:
  tokens, labels, position_ids   int64  [mb, seq_len]
  loss_mask                      float32 [mb, seq_len]
  cu_seqlens                     int32  [n+1]   (only with data.pack)

Real data: one megatron-core `GPTDataset` per blend entry and epoch (its
document/sample/shuffle indices, cached under data.cache_dir or
run_dir/data_cache); the blend with its step schedule is ours (blending.py).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from unittest import mock as _mock

import numpy as np
import torch

from ..config import ConfigError
from .blending import BlendSchedule
from .tokenizer import EOS_ID, load_tokenizer


# ---------------------------------------------------------------- tokenizer check
def check_tokenizer(cfg):
    """Fail early when the tokenizer is missing or has more ids than the model's embedding.

    Returns the loaded tokenizer, or None for mock data without a tokenizer.
    """
    path = cfg.data.tokenizer
    if not path:
        if cfg.data.mock:
            return None
        raise ConfigError("data.tokenizer is not set; point it at a sentencepiece .model "
                          "(e.g. data.tokenizer=data/demo/tokenizer.model after `jinpan data demo`)")
    if not Path(path).exists():
        raise ConfigError(f"data.tokenizer={path} does not exist; train one with `jinpan tokenizer train` "
                          "or run `jinpan data demo`")
    tok = load_tokenizer(path)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"data.tokenizer={path} has {tok.vocab_size} tokens but model.vocab_size="
                          f"{cfg.model.vocab_size}; set model.vocab_size={tok.vocab_size} "
                          "(resize the checkpoint's embeddings if you extended the tokenizer)")
    return tok


# ---------------------------------------------------------------- samples and rows
@dataclass
class Sample:
    """seq_len+1 token ids and the lengths of the document pieces they are made of."""
    text: np.ndarray
    parts: list[int]
    padded: int = 0  # trailing pad tokens (short validation tails only)


def _row(sample: Sample, seq_len: int, pack: bool):
    text = sample.text
    tokens = text[:-1].astype(np.int64)
    labels = text[1:].astype(np.int64)
    loss_mask = np.ones(seq_len, dtype=np.float32)
    if sample.padded:
        loss_mask[seq_len - sample.padded:] = 0.0
    starts = [0]
    if pack:
        p = 0
        for length in sample.parts[:-1]:
            p += int(length)
            if 0 < p <= seq_len:
                loss_mask[p - 1] = 0.0  # its label is the next document's first token
            if 0 < p < seq_len:
                starts.append(p)
        pos = np.empty(seq_len, dtype=np.int64)
        bounds = starts + [seq_len]
        for a, b in zip(bounds, bounds[1:]):
            pos[a:b] = np.arange(b - a)
    else:
        pos = np.arange(seq_len, dtype=np.int64)
    return tokens, labels, loss_mask, pos, starts


def collate(samples: list[Sample], seq_len: int, pack: bool) -> dict:
    rows = [_row(s, seq_len, pack) for s in samples]
    batch = {
        "tokens": torch.from_numpy(np.stack([r[0] for r in rows])),
        "labels": torch.from_numpy(np.stack([r[1] for r in rows])),
        "loss_mask": torch.from_numpy(np.stack([r[2] for r in rows])),
        "position_ids": torch.from_numpy(np.stack([r[3] for r in rows])),
    }
    if pack:
        cu = [i * seq_len + s for i, r in enumerate(rows) for s in r[4]] + [len(rows) * seq_len]
        batch["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
    return batch


def _check_layout(cfg, dp_rank: int, dp_size: int) -> tuple[int, int]:
    gb, mb = cfg.train.global_batch, cfg.train.micro_batch
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ConfigError(f"data-parallel rank {dp_rank} is outside dp size {dp_size}")
    if mb < 1 or gb % (mb * dp_size):
        raise ConfigError(f"train.global_batch={gb} must be divisible by train.micro_batch={mb} x dp={dp_size}; "
                          f"set train.global_batch to a multiple of {mb * dp_size}")
    return gb // dp_size, mb


# ---------------------------------------------------------------- mock data
class MockSource:
    """Deterministic synthetic documents: arithmetic token sequences (a + b*j) mod V with
    ~5% noise tokens, random lengths. Learnable from two tokens of context, never trivial."""

    def __init__(self, seed: int, vocab_size: int, seq_len: int, salt: int = 0):
        self.seed, self.vocab, self.seq_len, self.salt = int(seed), int(vocab_size), int(seq_len), int(salt)

    def __len__(self) -> int:
        return 1 << 62

    def sample(self, index: int) -> Sample:
        rng = np.random.default_rng([self.seed, self.salt, int(index), 0x6D6F636B])
        need = self.seq_len + 1
        lo, span = 3, max(self.vocab - 3, 1)
        pieces, parts = [], []
        while need > 0:
            length = int(min(need, rng.integers(8, max(9, self.seq_len // 2 + 1))))
            a = int(rng.integers(0, span))
            b = int(rng.choice([1, 2, 3, 5, 7]))
            doc = (a + b * np.arange(length)) % span + lo
            noise = rng.random(length) < 0.05
            doc[noise] = rng.integers(lo, lo + span, size=int(noise.sum()))
            pieces.append(doc)
            parts.append(length)
            need -= length
        return Sample(np.concatenate(pieces).astype(np.int64), parts)


# ---------------------------------------------------------------- megatron-core GPTDataset
class _EodTokenizer:
    """The little of a tokenizer GPTDatasetConfig needs (we never use its EOD masks)."""

    def __init__(self, eod: int = EOS_ID):
        self.eod = eod
        self.vocab_size = None
        self.unique_identifiers = {"class": "megatron_jinpan.eod", "eod": eod}


@contextlib.contextmanager
def _cache_lock(cache_dir: str):
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, ".lock"), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _split_bounds(split: str, num_docs: int, key: str = "data.split") -> list[tuple[int, int]]:
    try:
        parts = [float(x) for x in str(split).replace("/", ",").split(",")]
    except ValueError:
        raise ConfigError(f"{key}={split!r} must be three comma-separated numbers like 98,2,0") from None
    while len(parts) < 3:
        parts.append(0.0)
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"{key}={split!r} must be three non-negative numbers like 98,2,0")
    total = sum(parts)
    cum = np.cumsum([0.0] + [p / total for p in parts])
    ends = [int(round(c * num_docs)) for c in cum]
    return [(ends[i], ends[i + 1]) for i in range(3)]


def _check_prefix(path: str, key: str) -> str:
    path = str(path)
    if path.endswith((".bin", ".idx")):
        path = path[:-4]
    missing = [s for s in (".bin", ".idx") if not Path(path + s).is_file()]
    if missing:
        raise FileNotFoundError(f"{key}={path}: {path}{missing[0]} does not exist; make it with "
                                "`jinpan preprocess --output-prefix ...` (or `jinpan data demo`)")
    return path


class IndexedSource:
    """One preprocessed dataset (a document range of it) as an endless stream of seq_len+1-token
    samples: epoch e is a megatron-core GPTDataset shuffled with seed+e (built lazily, cached)."""

    def __init__(self, prefix: str, name: str, seq_len: int, seed: int, cache_dir: str,
                 doc_range: tuple[int, int] | None, split_name: str, key: str, split_str: str):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix, self.name, self.seq_len, self.seed = prefix, name, seq_len, seed
        self.cache_dir, self.split_name, self.key, self.split_str = cache_dir, split_name, key, split_str
        self.indexed = IndexedDataset(prefix, multimodal=False, mmap=True)
        n = len(self.indexed.document_indices) - 1
        lo, hi = doc_range if doc_range is not None else (0, n)
        if hi <= lo:
            raise ConfigError(f"{key}={prefix} has no documents in its {split_name} split "
                              f"({n} documents, data.split={split_str}); change data.split or add data")
        self.doc_indices = np.arange(lo, hi, dtype=np.int32)
        self._epochs: dict[int, object] = {}
        self._len = len(self._epoch(0))
        if self._len == 0:
            tokens = int(self.indexed.sequence_lengths[lo:hi].sum())
            raise ConfigError(f"{key}={prefix} has only {tokens} tokens in its {split_name} split, fewer than "
                              f"train.seq_len+1={seq_len + 1}; lower train.seq_len or add data")

    def __len__(self) -> int:
        return self._len

    def _epoch(self, epoch: int):
        if epoch not in self._epochs:
            from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
            from megatron.core.datasets.utils import Split

            config = GPTDatasetConfig(
                random_seed=self.seed + epoch, sequence_length=self.seq_len,
                blend=([self.prefix], None), split=self.split_str, path_to_cache=self.cache_dir,
                tokenizer=_EodTokenizer(), reset_position_ids=False, reset_attention_mask=False,
                eod_mask_loss=False, create_attention_mask=False,
            )
            split = Split.valid if self.split_name == "valid" else Split.train
            with _cache_lock(self.cache_dir), _mock.patch("torch.distributed.is_initialized", return_value=False):
                # under the lock whichever process comes first builds and saves the indices
                self._epochs[epoch] = GPTDataset(self.indexed, self.prefix, self.doc_indices, None, split, config)
        return self._epochs[epoch]

    def sample(self, index: int) -> Sample:
        epoch, i = divmod(int(index), self._len)
        ds = self._epoch(epoch)
        j = int(ds.shuffle_index[i])
        b, b_off = (int(x) for x in ds.sample_index[j])
        e, e_off = (int(x) for x in ds.sample_index[j + 1])
        extra = int(ds.config.add_extra_token_to_sequence)
        pieces = []
        if b == e:
            pieces.append(self.indexed.get(int(ds.document_index[b]), offset=b_off, length=e_off - b_off + extra))
        else:
            for d in range(b, e + 1):
                offset = b_off if d == b else 0
                length = None if d < e else e_off + extra
                if length == 0:
                    continue
                pieces.append(self.indexed.get(int(ds.document_index[d]), offset=offset, length=length))
        text = np.concatenate(pieces).astype(np.int64)
        parts = [len(p) for p in pieces]
        padded = self.seq_len + 1 - len(text)
        if padded > 0:
            text = np.concatenate([text, np.zeros(padded, dtype=np.int64)])
            parts.append(padded)
        return Sample(text[: self.seq_len + 1], parts, max(padded, 0))


def _cache_dir(cfg) -> str:
    return cfg.data.cache_dir or os.path.join(cfg.run_dir, "data_cache")


def _entry_name(entry: dict, path: str) -> str:
    name = entry.get("name")
    if name:
        return str(name)
    base = Path(path).name
    return base[: -len("_text_document")] if base.endswith("_text_document") else base


# ---------------------------------------------------------------- train data
class TrainData:
    """Blended (or mock) training samples addressed by step."""

    def __init__(self, cfg, sources: list, schedule: BlendSchedule):
        self.cfg = cfg
        self.sources = sources
        self.schedule = schedule
        self.names = schedule.names
        self.seq_len = cfg.train.seq_len
        self.pack = bool(cfg.data.pack)

    def step_assignment(self, step: int) -> list[tuple[int, int]]:
        """(dataset, sample index within it) for each of the GB global samples of `step`."""
        gb = self.cfg.train.global_batch
        counts = self.schedule.allocation(step)
        start = self.schedule.consumed(step)
        labels = np.repeat(np.arange(len(counts)), counts)
        rng = np.random.default_rng([int(self.cfg.train.seed), int(step), 0xB1E4D])
        order = labels[rng.permutation(gb)] if len(counts) > 1 else labels
        out, seen = [], [0] * len(counts)
        for k in order.tolist():
            out.append((k, start[k] + seen[k]))
            seen[k] += 1
        return out

    def samples(self, step: int, dp_rank: int = 0, dp_size: int = 1) -> list[Sample]:
        per_rank, _ = _check_layout(self.cfg, dp_rank, dp_size)
        assign = self.step_assignment(step)[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        return [self.sources[k].sample(i) for k, i in assign]

    def microbatches(self, step: int, dp_rank: int = 0, dp_size: int = 1) -> list[dict]:
        per_rank, mb = _check_layout(self.cfg, dp_rank, dp_size)
        samples = self.samples(step, dp_rank, dp_size)
        return [collate(samples[i:i + mb], self.seq_len, self.pack) for i in range(0, per_rank, mb)]

    def weights(self, step: int) -> dict[str, float]:
        """Blend weights at `step` by dataset name (for logging)."""
        return dict(zip(self.names, self.schedule.weights(step)))


class EvalData:
    """A held-out set read in order: eval batch i = samples [i*GB, (i+1)*GB) (wrapping)."""

    def __init__(self, cfg, source, name: str):
        self.cfg, self.source, self.name = cfg, source, name
        self.seq_len = cfg.train.seq_len
        self.pack = bool(cfg.data.pack)

    def __len__(self) -> int:
        return len(self.source)

    def microbatches(self, i: int, dp_rank: int = 0, dp_size: int = 1) -> list[dict]:
        per_rank, mb = _check_layout(self.cfg, dp_rank, dp_size)
        gb = self.cfg.train.global_batch
        n = len(self.source)
        first = i * gb + dp_rank * per_rank
        samples = [self.source.sample((first + j) % n) for j in range(per_rank)]
        return [collate(samples[j:j + mb], self.seq_len, self.pack) for j in range(0, per_rank, mb)]


def _blend_entries(cfg) -> list[tuple[str, str, float, str]]:
    """(prefix, name, weight, key) per data.blend entry, validated."""
    blend = cfg.data.blend
    if not blend:
        raise ConfigError("data.blend is empty; list preprocessed datasets as [{path: PREFIX, weight: W, name: N}] "
                          "(see `jinpan data demo`) or set data.mock=true")
    out, names = [], set()
    for i, entry in enumerate(blend):
        key = f"data.blend[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or "path" not in entry:
            raise ConfigError(f"{key} must be a mapping {{path: PREFIX, weight: W, name: NAME}}, got {entry!r}")
        unknown = sorted(set(entry) - {"path", "weight", "name"})
        if unknown:
            raise ConfigError(f"unknown key {key}.{unknown[0]}; valid keys: path, weight, name")
        prefix = _check_prefix(entry["path"], f"{key}.path")
        name = _entry_name(entry, prefix)
        if name in names:
            raise ConfigError(f"{key}.name={name!r} is used twice; give each blend entry its own name")
        names.add(name)
        out.append((prefix, name, entry.get("weight", 1.0), key))
    return out


def build_train_data(cfg) -> TrainData:
    """Training data for `cfg` (mock or blended megatron-core GPT datasets)."""
    t = cfg.train
    if t.seq_len < 1:
        raise ConfigError(f"train.seq_len={t.seq_len} must be positive")
    if t.micro_batch < 1 or t.global_batch % t.micro_batch:
        raise ConfigError(f"train.global_batch={t.global_batch} must be divisible by train.micro_batch={t.micro_batch}")
    if cfg.data.mock:
        source = MockSource(t.seed, cfg.model.vocab_size, t.seq_len)
        return TrainData(cfg, [source], BlendSchedule(["mock"], [1.0], None, t.global_batch))
    entries = _blend_entries(cfg)
    schedule = BlendSchedule([e[1] for e in entries], [e[2] for e in entries], cfg.data.blend_schedule, t.global_batch)
    cache = _cache_dir(cfg)
    sources = []
    for k, (prefix, name, _, key) in enumerate(entries):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        n = len(IndexedDataset(prefix, mmap=True).document_indices) - 1
        lo, hi = _split_bounds(cfg.data.split, n)[0]
        sources.append(IndexedSource(prefix, name, t.seq_len, t.seed + 1000 * k, cache, (lo, hi), "train",
                                     f"{key}.path", cfg.data.split))
    return TrainData(cfg, sources, schedule)


def build_eval_data(cfg) -> dict[str, EvalData]:
    """Held-out sets by name: data.valid entries, else the valid split of each blend entry
    (when data.split gives it documents); mock data gives {"mock": ...}."""
    t = cfg.train
    if cfg.data.mock:
        return {"mock": EvalData(cfg, MockSource(t.seed, cfg.model.vocab_size, t.seq_len, salt=1), "mock")}
    cache = _cache_dir(cfg)
    out: dict[str, EvalData] = {}
    if cfg.data.valid:
        for i, entry in enumerate(cfg.data.valid):
            key = f"data.valid[{i}]"
            if isinstance(entry, str):
                entry = {"path": entry}
            if not isinstance(entry, dict) or "path" not in entry:
                raise ConfigError(f"{key} must be a mapping {{path: PREFIX, name: NAME}}, got {entry!r}")
            unknown = sorted(set(entry) - {"path", "name"})
            if unknown:
                raise ConfigError(f"unknown key {key}.{unknown[0]}; valid keys: path, name")
            prefix = _check_prefix(entry["path"], f"{key}.path")
            name = _entry_name(entry, prefix)
            if name in out:
                raise ConfigError(f"{key}.name={name!r} is used twice; give each valid entry its own name")
            source = IndexedSource(prefix, name, t.seq_len, t.seed, cache, None, "valid", f"{key}.path", "100,0,0")
            out[name] = EvalData(cfg, source, name)
        return out
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix, name, _, key in _blend_entries(cfg):
        n = len(IndexedDataset(prefix, mmap=True).document_indices) - 1
        lo, hi = _split_bounds(cfg.data.split, n)[1]
        if hi > lo:
            out[name] = EvalData(cfg, IndexedSource(prefix, name, t.seq_len, t.seed, cache, (lo, hi), "valid",
                                                    f"{key}.path", cfg.data.split), name)
    return out
