"""SFT data: chat datasets (answer-only loss) blended with pretraining text (loss on all tokens).

    from megatron_jinpan.data.sft_datasets import build_sft_train_data, build_sft_eval_data
    train = build_sft_train_data(cfg)        # cfg.data.blend may mix chat and text datasets
    for mb in train.microbatches(step, dp_rank, dp_size): ...

A blend entry is a chat dataset when `jinpan preprocess --format chat` wrote
it (PREFIX.mask.bin/.idx beside PREFIX.bin/.idx); otherwise it is pretraining
text, read exactly as `jinpan pretrain` reads it. Weights, `data.blend_schedule`,
`data.split` and `data.valid` work as in pretraining, and the order contract
is the same (step t = global samples [t*GB, (t+1)*GB), sliced by DP rank).

A chat sample is one row of `train.seq_len` positions:
- `sft.packing=false`: one conversation, padded (pad positions carry no loss);
- `sft.packing=true`: consecutive conversations of a shuffled epoch, as many as fit, each
  in its own attention segment (`cu_seqlens`) with position ids restarting at 0.
A conversation of L tokens takes L-1 positions (inputs ids[:-1], labels ids[1:], loss mask
mask[1:]), so a packed row's loss is exactly the sum of its conversations' losses. One longer
than seq_len+1 tokens is cut to its first seq_len+1 (`sft.truncation=right`) or left out
(`sft.truncation=drop`).

Micro-batches carry, besides the pretraining keys, `is_chat` float32 [mb] (1 for a chat row),
from which the SFT loss counts `answer_tokens`.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import ConfigError
from .blending import BlendSchedule
from .chat_preprocess import MASK_SUFFIX, is_chat_dataset, read_meta
from .datasets import (EvalData, IndexedSource, Sample, TrainData, _blend_entries, _cache_dir, _check_layout,
                       _check_prefix, _entry_name, _row, _split_bounds)

PAD_ID = 0  # pad positions: any valid id, never a label with loss


class ChatRow:
    """One row's conversations: a list of (ids, mask) int64 arrays."""

    def __init__(self, pieces: list[tuple[np.ndarray, np.ndarray]]):
        self.pieces = pieces


def chat_row(row: ChatRow, seq_len: int):
    """(tokens, labels, loss_mask, position_ids, segment starts) of a chat row."""
    tokens = np.full(seq_len, PAD_ID, dtype=np.int64)
    labels = np.full(seq_len, PAD_ID, dtype=np.int64)
    loss_mask = np.zeros(seq_len, dtype=np.float32)
    pos = np.zeros(seq_len, dtype=np.int64)
    starts, p = [], 0
    for ids, mask in row.pieces:
        n = len(ids) - 1
        if n <= 0:
            continue
        tokens[p:p + n], labels[p:p + n] = ids[:-1], ids[1:]
        loss_mask[p:p + n] = mask[1:]
        pos[p:p + n] = np.arange(n)
        starts.append(p)
        p += n
    if p < seq_len:  # the padding is a segment of its own: no real token attends to it
        starts.append(p)
        pos[p:] = np.arange(seq_len - p)
    return tokens, labels, loss_mask, pos, starts


def collate_rows(rows: list, seq_len: int, text_pack: bool, segments: bool) -> dict:
    """Micro-batch of chat rows and/or text Samples; `segments` adds cu_seqlens (packed attention)."""
    built, is_chat = [], []
    for r in rows:
        if isinstance(r, ChatRow):
            built.append(chat_row(r, seq_len))
            is_chat.append(1.0)
        else:
            built.append(_row(r, seq_len, text_pack))
            is_chat.append(0.0)
    batch = {
        "tokens": torch.from_numpy(np.stack([b[0] for b in built])),
        "labels": torch.from_numpy(np.stack([b[1] for b in built])),
        "loss_mask": torch.from_numpy(np.stack([b[2] for b in built])),
        "position_ids": torch.from_numpy(np.stack([b[3] for b in built])),
        "is_chat": torch.tensor(is_chat, dtype=torch.float32),
    }
    if segments:
        cu = [i * seq_len + s for i, b in enumerate(built) for s in (b[4] or [0])] + [len(built) * seq_len]
        batch["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
    return batch


def pack_rows(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Row starts for packing conversations of `lengths` positions, in order, into rows of seq_len
    (greedy: a conversation that does not fit starts the next row). Returns starts + [len(lengths)]."""
    starts, used = [0], 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > seq_len and used > 0:
            starts.append(i)
            used = 0
        used += n
    starts.append(len(lengths))
    return np.asarray(starts, dtype=np.int64)


class ChatSource:
    """A preprocessed chat dataset (a conversation range of it) as an endless stream of rows:
    epoch e visits the conversations in a permutation seeded by seed+e."""

    def __init__(self, prefix: str, name: str, seq_len: int, seed: int, doc_range: tuple[int, int] | None,
                 key: str, split_name: str, packing: bool, truncation: str):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix, self.name, self.seq_len, self.seed, self.packing = prefix, name, seq_len, seed, packing
        self.tokens = IndexedDataset(prefix, mmap=True)
        self.masks = IndexedDataset(prefix + MASK_SUFFIX, mmap=True)
        lengths = np.asarray(self.tokens.sequence_lengths, dtype=np.int64)
        if not np.array_equal(lengths, np.asarray(self.masks.sequence_lengths, dtype=np.int64)):
            raise ConfigError(f"{key}={prefix}: {prefix}{MASK_SUFFIX}.bin/.idx does not match the token data "
                              "(different conversation lengths); preprocess the chat JSONL again")
        lo, hi = doc_range if doc_range is not None else (0, len(lengths))
        docs = np.arange(lo, hi, dtype=np.int64)
        if truncation == "drop":
            docs = docs[lengths[lo:hi] <= seq_len + 1]
        if len(docs) == 0:
            raise ConfigError(f"{key}={prefix} has no conversations in its {split_name} split"
                              + (f" of at most train.seq_len+1={seq_len + 1} tokens (sft.truncation=drop)"
                                 if truncation == "drop" and hi > lo else "")
                              + "; change data.split / sft.truncation or add data")
        self.docs = docs
        self.positions = np.minimum(lengths[docs], seq_len + 1) - 1  # positions each conversation takes
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(conversation order, row starts into it) of one epoch."""
        if epoch not in self._epochs:
            perm = np.random.default_rng([self.seed, epoch, 0x5F7]).permutation(len(self.docs))
            if self.packing:
                starts = pack_rows(self.positions[perm], self.seq_len)
            else:
                starts = np.arange(len(perm) + 1, dtype=np.int64)
            self._epochs[epoch] = (self.docs[perm], starts)
        return self._epochs[epoch]

    def __len__(self) -> int:
        return len(self._epoch(0)[1]) - 1

    def conversation(self, doc: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokens.get(int(doc)).astype(np.int64)[: self.seq_len + 1]
        mask = self.masks.get(int(doc)).astype(np.int64)[: self.seq_len + 1]
        return ids, mask

    def sample(self, index: int) -> ChatRow:
        epoch, index = 0, int(index)
        while index >= len(self._epoch(epoch)[1]) - 1:  # packed epochs differ a little in row count
            index -= len(self._epoch(epoch)[1]) - 1
            epoch += 1
        order, starts = self._epoch(epoch)
        return ChatRow([self.conversation(d) for d in order[starts[index]:starts[index + 1]]])


class SFTTrainData(TrainData):
    def microbatches(self, step: int, dp_rank: int = 0, dp_size: int = 1) -> list[dict]:
        per_rank, mb = _check_layout(self.cfg, dp_rank, dp_size)
        rows = self.samples(step, dp_rank, dp_size)
        return [collate_rows(rows[i:i + mb], self.seq_len, self.pack, _segments(self.cfg))
                for i in range(0, per_rank, mb)]


class SFTEvalData(EvalData):
    def microbatches(self, i: int, dp_rank: int = 0, dp_size: int = 1) -> list[dict]:
        per_rank, mb = _check_layout(self.cfg, dp_rank, dp_size)
        first = i * self.cfg.train.global_batch + dp_rank * per_rank
        n = len(self.source)
        rows = [self.source.sample((first + j) % n) for j in range(per_rank)]
        return [collate_rows(rows[j:j + mb], self.seq_len, self.pack, _segments(self.cfg))
                for j in range(0, per_rank, mb)]


def _segments(cfg) -> bool:
    return bool(cfg.sft.packing or cfg.data.pack)


def check_chat_dataset(cfg, prefix: str, key: str) -> None:
    """A chat dataset must have been made with sft.template and a tokenizer that fits the model."""
    meta = read_meta(prefix) or {}
    template = meta.get("template")
    if template is not None and template != cfg.sft.template:
        raise ConfigError(f"{key}={prefix} was preprocessed with chat template {template!r} but "
                          f"sft.template={cfg.sft.template!r}; set sft.template={template} or preprocess again")
    vocab = meta.get("vocab_size")
    if vocab is not None and vocab > cfg.model.vocab_size:
        raise ConfigError(f"{key}={prefix} was tokenized with a {vocab}-token tokenizer ({meta.get('tokenizer')}) "
                          f"but model.vocab_size={cfg.model.vocab_size}; use the model's tokenizer or resize "
                          "the model's embeddings")
    if vocab is not None and cfg.data.tokenizer:
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.data.tokenizer)
        if tok.vocab_size != vocab:
            raise ConfigError(f"{key}={prefix} was tokenized with {meta.get('tokenizer')} ({vocab} tokens) but "
                              f"data.tokenizer={cfg.data.tokenizer} has {tok.vocab_size}; preprocess with "
                              "data.tokenizer or point data.tokenizer at the tokenizer the data was made with")


def _source(cfg, prefix: str, name: str, key: str, seed: int, split: str, split_name: str):
    """A chat or text source for the `split_name` part ("train" | "valid") of one dataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    t = cfg.train
    n = len(IndexedDataset(prefix, mmap=True).document_indices) - 1
    bounds = _split_bounds(split, n)[0 if split_name == "train" else 1]
    if is_chat_dataset(prefix):
        check_chat_dataset(cfg, prefix, key)
        return ChatSource(prefix, name, t.seq_len, seed, bounds, key, split_name, cfg.sft.packing,
                          cfg.sft.truncation)
    return IndexedSource(prefix, name, t.seq_len, seed, _cache_dir(cfg), bounds, split_name, key, split)


def build_sft_train_data(cfg) -> SFTTrainData:
    """Training rows for `cfg`: chat and text datasets blended per data.blend(+_schedule)."""
    t = cfg.train
    if cfg.data.mock:
        raise ConfigError("data.mock=true has no conversations; point data.blend at chat datasets made with "
                          "`jinpan preprocess --format chat` (or `jinpan data demo`)")
    entries = _blend_entries(cfg)
    schedule = BlendSchedule([e[1] for e in entries], [e[2] for e in entries], cfg.data.blend_schedule,
                             t.global_batch)
    if not any(is_chat_dataset(prefix) for prefix, *_ in entries):
        raise ConfigError("data.blend has no chat dataset (one made with `jinpan preprocess --format chat`); "
                          "SFT needs at least one — for text only use `jinpan pretrain`")
    sources = [_source(cfg, prefix, name, f"{key}.path", t.seed + 1000 * k, cfg.data.split, "train")
               for k, (prefix, name, _, key) in enumerate(entries)]
    return SFTTrainData(cfg, sources, schedule)


def build_sft_eval_data(cfg) -> dict[str, SFTEvalData]:
    """Held-out sets by name: data.valid entries (whole datasets), else each blend entry's valid split."""
    t = cfg.train
    out: dict[str, SFTEvalData] = {}
    if cfg.data.valid:
        for i, entry in enumerate(cfg.data.valid):
            key = f"data.valid[{i}]"
            entry = {"path": entry} if isinstance(entry, str) else entry
            if not isinstance(entry, dict) or "path" not in entry or set(entry) - {"path", "name"}:
                raise ConfigError(f"{key} must be a mapping {{path: PREFIX, name: NAME}}, got {entry!r}")
            prefix = _check_prefix(entry["path"], f"{key}.path")
            name = _entry_name(entry, prefix)
            if name in out:
                raise ConfigError(f"{key}.name={name!r} is used twice; give each valid entry its own name")
            out[name] = SFTEvalData(cfg, _source(cfg, prefix, name, f"{key}.path", t.seed, "100,0,0", "train"), name)
        return out
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix, name, _, key in _blend_entries(cfg):
        n = len(IndexedDataset(prefix, mmap=True).document_indices) - 1
        lo, hi = _split_bounds(cfg.data.split, n)[1]
        if hi > lo:
            out[name] = SFTEvalData(cfg, _source(cfg, prefix, name, f"{key}.path", t.seed, cfg.data.split, "valid"),
                                    name)
    return out


__all__ = ["ChatRow", "ChatSource", "Sample", "SFTTrainData", "SFTEvalData", "build_sft_train_data",
           "build_sft_eval_data", "chat_row", "collate_rows", "pack_rows", "check_chat_dataset"]
