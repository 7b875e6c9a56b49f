"""Preference pairs: JSONL -> tokenized pairs on disk -> micro-batches for the reward model and DPO.

    jinpan preprocess --format pairs --input prefs.jsonl --tokenizer tok.model --output-prefix data/prefs \
        [--template plain] [--max-seq-len 2048] [--workers 8]

Accepted records (one pair per line; optional "margin": number):
    {"prompt": "...", "chosen": "...", "rejected": "..."}                  # strings
    {"prompt": [messages], "chosen": [messages] | "...", "rejected": ...}  # the prompt as a conversation
    {"chosen": [messages], "rejected": [messages]}                         # whole conversations (HH-RLHF style)
Messages are OpenAI {"role", "content"} or ShareGPT {"from", "value"}. Each side is rendered with the
SFT chat template (posttrain/chat.py) and ends with the assistant's EOS.

Counted and skipped (never an error): an empty side, identical sides, a side longer than
--max-seq-len (it would be truncated past its answer). Malformed lines are errors naming file and line.

On disk (`PREFIX` = --output-prefix):
    PREFIX.bin/.idx        megatron-core indexed dataset; document k = pair k = [chosen, rejected]
    PREFIX.mask.bin/.idx   same layout, uint8: 1 on the tokens of the final answer (its EOS included)
    PREFIX.margin.npy      float32 margin per pair (0 when absent)
    PREFIX.pairs.json      counts, skips, template, tokenizer

Micro-batches (`PairData.microbatches(step, dp_rank, dp)`), both sides of a pair always in the same
micro-batch (hence the same DP rank):
- padded (data.pack=false): train.global_batch / micro_batch count PAIRS; a micro-batch of m pairs is
  2m rows [chosen_0, rejected_0, chosen_1, ...], each right-padded with 0 to train.seq_len;
- packed (data.pack=true): they count ROWS of train.seq_len tokens; whole sequences are placed
  first-fit into the micro-batch's rows (a pair never split across micro-batches), with per-document
  attention (cu_seqlens) and positions restarting at each sequence. Pairs per micro-batch vary: the
  losses are sums over pairs divided by the global number of pairs.

Each micro-batch dict holds tokens/position_ids [R, S] (+ cu_seqlens), labels [R, S] (next token),
loss_mask [R, S] (1 where the label is an answer token), and per pair / per sequence:
    score_index [2P]   flat index (row * S + pos) of each sequence's last token (its EOS);
                       sequence 2p is pair p's chosen side, 2p+1 its rejected side
    segment     [R, S] which sequence a label position's answer token belongs to (2P = none)
    margin [P], pair_weight [P] (0 for eval padding past the end of a held-out set)
    pair_key [P], pair_set []   the pairs' positions in their PairData and its uid
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..data.preprocess import encoded_chunks, staged_outputs
from ..data.tokenizer import DataError, load_tokenizer

FORMAT = "megatron-jinpan-pairs"
SKIP_REASONS = ("empty", "identical", "too_long")
CHUNK_LINES = 128


# ---------------------------------------------------------------- records -> two conversations
def _turns(value, where: str, field: str) -> list[dict]:
    from .chat import SHAREGPT_ROLES, _from_messages

    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where}: {field!r} must be a string or a list of messages, got {type(value).__name__}")
    if value and isinstance(value[0], dict) and "from" in value[0]:
        return _from_messages(value, where, field, "from", "value", SHAREGPT_ROLES)
    return _from_messages(value, where, field, "role", "content", None)


def pair_conversations(record: dict, where: str) -> tuple[list[dict], list[dict], float]:
    """(chosen messages, rejected messages, margin) of one JSONL record; DataError names `where`."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {type(record).__name__}, not an object like "
                        "{\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}")
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(f"{where} has no {missing[0]!r} field (keys: {keys}); a preference pair needs "
                        "\"chosen\" and \"rejected\" (strings with a \"prompt\", or message lists)")
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        prompt_msgs = [{"role": "user", "content": prompt}]
    elif prompt is None:
        prompt_msgs = []
    else:
        prompt_msgs = _turns(prompt, where, "prompt")
    sides = []
    for key in ("chosen", "rejected"):
        value = record[key]
        if isinstance(value, str):
            if not prompt_msgs:
                raise DataError(f"{where}: {key!r} is a string but there is no \"prompt\"; give a prompt or "
                                "whole conversations as message lists")
            msgs = prompt_msgs + [{"role": "assistant", "content": value}]
        else:
            msgs = _turns(value, where, key)
            if msgs and msgs[0]["role"] == "assistant":  # only the answer turn(s): the prompt goes first
                msgs = prompt_msgs + msgs
        if not msgs or msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: {key!r} must end with an assistant message (the answer being judged)")
        sides.append(msgs)
    margin = record.get("margin", 0.0)
    if margin is None:
        margin = 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not np.isfinite(margin):
        raise DataError(f"{where}: \"margin\" must be a finite number, got {margin!r}")
    return sides[0], sides[1], float(margin)


def encode_side(messages: list[dict], template, tokenizer, where: str) -> tuple[list[int], list[int]]:
    """Ids of one side and its answer mask: 1 on the final assistant turn's tokens (EOS included)."""
    ids, mask = template.encode(messages, tokenizer, where)
    prompt_len = len(template.encode_prompt(messages[:-1], tokenizer, where))
    answer = [int(m and i >= prompt_len) for i, m in enumerate(mask)]
    return ids, answer


def encode_pair(record: dict, where: str, template, tokenizer, max_len: int):
    """((chosen ids, mask), (rejected ids, mask), margin), or the skip reason (a str)."""
    from .chat import NoAnswer

    chosen, rejected, margin = pair_conversations(record, where)
    if not chosen[-1]["content"].strip() or not rejected[-1]["content"].strip():
        return "empty"
    try:
        c = encode_side(chosen, template, tokenizer, f"{where} chosen")
        r = encode_side(rejected, template, tokenizer, f"{where} rejected")
    except NoAnswer:
        return "empty"
    if c[0] == r[0]:
        return "identical"
    if not any(c[1]) or not any(r[1]):
        return "empty"
    if max(len(c[0]), len(r[0])) > max_len:
        return "too_long"
    return c, r, margin


# ---------------------------------------------------------------- preprocessing
_worker_state: dict = {}


def _init_worker(tokenizer_path: str, template: str, max_len: int) -> None:
    from .chat import load_template

    _worker_state.update(tok=load_tokenizer(tokenizer_path, key="--tokenizer"), template=load_template(template),
                         max_len=max_len)


def _encode_chunk(args):
    items = []
    for where, line in args:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno}); each line must be "
                            "one JSON object") from None
        items.append(encode_pair(record, where, _worker_state["template"], _worker_state["tok"],
                                 _worker_state["max_len"]))
    return items


def _line_chunks(path: str):
    chunk = []
    with open(path, encoding="utf-8") as fh:
        lineno = 0
        try:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    chunk.append((f"{path} line {lineno}", line))
                if len(chunk) >= CHUNK_LINES:
                    yield chunk
                    chunk = []
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} line {lineno + 1} is not valid UTF-8 ({exc.reason})") from None
    if chunk:
        yield chunk


def preprocess_pairs(input_path: str, tokenizer_path: str, output_prefix: str, *, template: str = "plain",
                     max_seq_len: int = 2048, workers: int = 1, progress: bool = True) -> dict:
    """Tokenize a JSONL file of preference pairs into PREFIX(.bin/.idx, .mask.bin/.idx, .margin.npy,
    .pairs.json); returns the counts. Written to temporary names and renamed at the end."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    from .chat import load_template

    if not Path(input_path).is_file():
        raise FileNotFoundError(f"--input {input_path} does not exist; pass a JSONL file with one "
                                "{\"prompt\", \"chosen\", \"rejected\"} pair per line")
    load_template(template)  # a bad template fails here, once
    tok = load_tokenizer(tokenizer_path, key="--tokenizer")
    prefix = str(output_prefix)
    # the .pairs.json last: a reader that sees it sees complete data
    finals = [prefix + ".bin", prefix + ".idx", prefix + ".mask.bin", prefix + ".mask.idx",
              prefix + ".margin.npy", prefix + ".pairs.json"]
    margins: list[float] = []
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    n_tokens = 0
    bar = tqdm(desc=f"pairs {Path(input_path).name}", unit="pair", disable=not progress, dynamic_ncols=True)
    init = (tokenizer_path, template, max_seq_len)
    try:
        with staged_outputs(*finals) as (tmps, builders), \
                encoded_chunks(_encode_chunk, _line_chunks(input_path), workers, _init_worker, init) as results:
            tokens = IndexedDatasetBuilder(str(tmps[0]), dtype=DType.optimal_dtype(tok.vocab_size))
            masks = IndexedDatasetBuilder(str(tmps[2]), dtype=np.uint8)
            builders += [tokens, masks]
            for items in results:
                for item in items:
                    bar.update(1)
                    if isinstance(item, str):
                        skipped[item] += 1
                        continue
                    (c_ids, c_mask), (r_ids, r_mask), margin = item
                    tokens.add_document(np.asarray(c_ids + r_ids, dtype=np.int64), [len(c_ids), len(r_ids)])
                    masks.add_document(np.asarray(c_mask + r_mask, dtype=np.uint8), [len(c_mask), len(r_mask)])
                    margins.append(margin)
                    n_tokens += len(c_ids) + len(r_ids)
            if not margins:
                raise DataError(f"--input {input_path} holds no usable pair (skipped: {skipped}); each line needs "
                                "a non-empty, different chosen and rejected answer")
            tokens.finalize(str(tmps[1]))
            masks.finalize(str(tmps[3]))
            with open(tmps[4], "wb") as fh:
                np.save(fh, np.asarray(margins, dtype=np.float32))
            info = {"format": FORMAT, "version": 1, "pairs": len(margins), "tokens": n_tokens, "skipped": skipped,
                    "template": template, "tokenizer": str(tokenizer_path), "max_seq_len": int(max_seq_len),
                    "input": str(input_path), "has_margin": any(m != 0.0 for m in margins)}
            tmps[5].write_text(json.dumps(info, indent=1) + "\n")
    finally:
        bar.close()
    info["prefix"] = prefix
    return info


def preprocess_command(args) -> int:
    """`jinpan preprocess --format pairs` (hooked into data/commands.py)."""
    info = preprocess_pairs(args.input, args.tokenizer, args.output_prefix, template=args.template or "plain",
                            max_seq_len=args.max_seq_len or 2048, workers=args.workers,
                            progress=not args.no_progress)
    sk = info["skipped"]
    print(f"wrote {info['prefix']}.bin/.idx (+ .mask, .margin.npy, .pairs.json): {info['pairs']} pairs, "
          f"{info['tokens']} tokens; skipped {sum(sk.values())} (empty side {sk['empty']}, identical sides "
          f"{sk['identical']}, longer than --max-seq-len {sk['too_long']})")
    return 0


# ---------------------------------------------------------------- reading
def check_pairs_prefix(prefix: str, key: str) -> str:
    prefix = str(prefix)
    for ext in (".bin", ".idx", ".pairs.json"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    missing = [s for s in (".bin", ".idx", ".mask.bin", ".mask.idx", ".margin.npy", ".pairs.json")
               if not Path(prefix + s).is_file()]
    if missing:
        raise FileNotFoundError(f"{key}={prefix}: {prefix}{missing[0]} does not exist; make it with "
                                "`jinpan preprocess --format pairs --output-prefix ...`")
    return prefix


class PairStore:
    """The pairs of one preprocessed prefix: ids, answer masks and margins by pair index."""

    def __init__(self, prefix: str, key: str = "data.blend[0].path"):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = check_pairs_prefix(prefix, key)
        self.info = json.loads(Path(self.prefix + ".pairs.json").read_text())
        self.tokens = IndexedDataset(self.prefix, multimodal=False, mmap=True)
        self.masks = IndexedDataset(self.prefix + ".mask", multimodal=False, mmap=True)
        self.margins = np.load(self.prefix + ".margin.npy")
        n = len(self.tokens.document_indices) - 1
        if len(self.tokens) != 2 * n or len(self.masks) != len(self.tokens) or len(self.margins) != n:
            raise DataError(f"{key}={self.prefix} is not a pairs dataset (documents must be [chosen, rejected] "
                            "with matching .mask and .margin.npy); remake it with `jinpan preprocess --format pairs`")
        lengths = self.tokens.sequence_lengths.reshape(n, 2)
        self.lengths = lengths.astype(np.int64)
        self.num_pairs = n

    def pair(self, k: int):
        """((chosen ids, mask), (rejected ids, mask), margin) as numpy arrays."""
        out = []
        for side in (0, 1):
            i = 2 * int(k) + side
            out.append((self.tokens[i].astype(np.int64), self.masks[i].astype(np.float32)))
        return out[0], out[1], float(self.margins[k])


# ---------------------------------------------------------------- micro-batches
@dataclass
class _Seq:
    ids: np.ndarray
    mask: np.ndarray


def collate_pairs(pairs: list, seq_len: int, pack: bool, rows: int | None = None,
                  weights: list[float] | None = None, keys: list[int] | None = None, set_uid: int = 0) -> dict:
    """One micro-batch from pairs [((c_ids, c_mask), (r_ids, r_mask), margin), ...].

    padded: 2 rows per pair. packed: `rows` rows, sequences placed first-fit (the caller checked they fit).
    """
    seqs = []
    for c, r, _ in pairs:
        seqs += [_Seq(*c), _Seq(*r)]
    n_rows = rows if pack else 2 * len(pairs)
    tokens = np.zeros((n_rows, seq_len), dtype=np.int64)
    answer = np.zeros((n_rows, seq_len), dtype=np.float32)
    segment = np.full((n_rows, seq_len), 2 * len(pairs), dtype=np.int64)
    position = np.zeros((n_rows, seq_len), dtype=np.int64)
    fill = [0] * n_rows
    starts: list[list[int]] = [[] for _ in range(n_rows)]
    score_index = np.zeros(len(seqs), dtype=np.int64)
    for k, seq in enumerate(seqs):
        n = len(seq.ids)
        if pack:
            row = next((i for i in range(n_rows) if fill[i] + n <= seq_len), None)
            if row is None:
                raise RuntimeError("pair packing error: a sequence does not fit its micro-batch")
        else:
            row = k
        a = fill[row]
        tokens[row, a:a + n] = seq.ids
        answer[row, a:a + n] = seq.mask
        segment[row, a:a + n] = k
        position[row, a:a + n] = np.arange(n)
        starts[row].append(a)
        fill[row] = a + n
        score_index[k] = row * seq_len + a + n - 1
    # Labels: the next token of the same sequence; loss_mask/segment move to the label positions.
    labels = np.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    loss_mask = np.zeros_like(answer)
    loss_mask[:, :-1] = answer[:, 1:]
    label_segment = np.full_like(segment, 2 * len(pairs))
    same = segment[:, 1:] == segment[:, :-1]
    label_segment[:, :-1] = np.where(same & (answer[:, 1:] > 0), segment[:, 1:], 2 * len(pairs))
    loss_mask[:, :-1] *= same
    for row in range(n_rows):  # the padding tail: its own document, positions from 0
        if fill[row] < seq_len:
            position[row, fill[row]:] = np.arange(seq_len - fill[row])
            starts[row].append(fill[row])
    batch = {
        "tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.from_numpy(position),
        "segment": torch.from_numpy(label_segment), "score_index": torch.from_numpy(score_index),
        "margin": torch.tensor([m for _, _, m in pairs], dtype=torch.float32),
        "pair_weight": torch.tensor(weights if weights is not None else [1.0] * len(pairs), dtype=torch.float32),
        # Which pairs these are (position in their PairData, and its uid): precomputed reference log-probs.
        "pair_key": torch.tensor(keys if keys is not None else [-1] * len(pairs), dtype=torch.int64),
        "pair_set": torch.tensor(set_uid, dtype=torch.int64),
    }
    if pack:
        cu = [r * seq_len + s for r in range(n_rows) for s in (starts[r] or [0])] + [n_rows * seq_len]
        batch["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
    return batch


def pair_count(mb: dict) -> torch.Tensor:
    """The loss units of a pairs micro-batch: its (weighted) number of pairs."""
    return mb["pair_weight"].sum()


def pack_groups(order: np.ndarray, lengths: np.ndarray, seq_len: int, rows: int) -> list[list[int]]:
    """Cut a pair order into micro-batches of `rows` rows: sequences first-fit, whole pairs only."""
    groups, current, fill = [], [], [0] * rows

    def place(fill, n):
        for i in range(rows):
            if fill[i] + n <= seq_len:
                fill[i] += n
                return True
        return False

    for k in order.tolist():
        trial = list(fill)
        if place(trial, int(lengths[k, 0])) and place(trial, int(lengths[k, 1])):
            current.append(k)
            fill = trial
            continue
        groups.append(current)
        current, fill = [k], [0] * rows
        place(fill, int(lengths[k, 0]))
        place(fill, int(lengths[k, 1]))
    if current:
        groups.append(current)
    return groups


class PairData:
    """Preference pairs addressed by step (train: shuffled per epoch) or by eval batch (held-out: in order).

    Samples depend only on (config, step): resume is exact. Pairs with a side longer than
    train.seq_len are left out (counted in `dropped`)."""

    def __init__(self, cfg, stores: list[PairStore], ranges: list[tuple[int, int]], shuffle: bool, name: str):
        t = cfg.train
        self.cfg, self.name, self.shuffle = cfg, name, shuffle
        self.uid = zlib.crc32(name.encode()) & 0x7FFFFFFF
        self.seq_len, self.pack = t.seq_len, bool(cfg.data.pack)
        self.stores = stores
        index, self.dropped = [], 0
        for s, (store, (lo, hi)) in enumerate(zip(stores, ranges)):
            ks = np.arange(lo, hi)
            fits = store.lengths[lo:hi].max(axis=1) <= self.seq_len
            if self.pack and cfg.train.micro_batch == 1:  # one row per micro-batch holds both sides
                fits &= store.lengths[lo:hi].sum(axis=1) <= self.seq_len
            self.dropped += int((~fits).sum())
            index += [(s, int(k)) for k in ks[fits]]
        if not index:
            raise ConfigError(f"{name}: no preference pair fits train.seq_len={self.seq_len} "
                              f"({self.dropped} longer); raise train.seq_len or preprocess with a smaller --max-seq-len")
        self.index = index  # (store, pair) of every usable pair
        self.lengths = np.stack([stores[s].lengths[k] for s, k in index])
        self._epochs: dict[int, list[list[int]]] = {}
        self._counts: dict[int, int] = {}
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.index))
        if epoch not in self._orders:  # memoised: the last two epochs (a step may straddle two)
            self._orders[epoch] = np.random.default_rng([int(self.cfg.train.seed), int(epoch), 0x9A125]).permutation(
                len(self.index))
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
        return self._orders[epoch]

    def _groups(self, epoch: int) -> list[list[int]]:
        """Packed micro-batches of one epoch (memoised; a pure function of the epoch)."""
        if epoch not in self._epochs:
            self._epochs[epoch] = pack_groups(self._order(epoch), self.lengths, self.seq_len,
                                              self.cfg.train.micro_batch)
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
        return self._epochs[epoch]

    def _count(self, epoch: int) -> int:
        """Micro-batches in packed epoch `epoch` (kept for every epoch seen: a few ints)."""
        if epoch not in self._counts:
            self._counts[epoch] = len(self._groups(epoch))
        return self._counts[epoch]

    def _load(self, positions: list[int]) -> list:
        return [self.stores[self.index[p][0]].pair(self.index[p][1]) for p in positions]

    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.global_batch * t.seq_len * (1 if self.pack else 2)

    def microbatches(self, step: int, dp_rank: int = 0, dp_size: int = 1) -> list[dict]:
        from ..data.datasets import _check_layout

        per_rank, mb = _check_layout(self.cfg, dp_rank, dp_size)
        gb, n = self.cfg.train.global_batch, len(self.index)
        out = []
        if not self.pack:  # global_batch pairs per step
            first = step * gb + dp_rank * per_rank
            for j in range(0, per_rank, mb):
                pos = list(range(first + j, first + j + mb))
                if self.shuffle:
                    picks = [int(self._order(p // n)[p % n]) for p in pos]
                    weights = None
                else:  # held-out: in order, once; past the end repeats pair 0 with weight 0
                    picks = [p if p < n else 0 for p in pos]
                    weights = [1.0 if p < n else 0.0 for p in pos]
                out.append(collate_pairs(self._load(picks), self.seq_len, False, weights=weights, keys=picks,
                                         set_uid=self.uid))
            return out
        groups_per_step = gb // mb
        for j in range(per_rank // mb):
            g = step * groups_per_step + dp_rank * (per_rank // mb) + j
            if self.shuffle:
                epoch = 0
                while g >= self._count(epoch):
                    g -= self._count(epoch)
                    epoch += 1
                picks = self._groups(epoch)[g]
            else:
                groups = self._groups(0)
                picks = groups[g] if g < len(groups) else []
            out.append(collate_pairs(self._load(picks), self.seq_len, True, rows=mb, keys=picks, set_uid=self.uid))
        return out


def build_pair_data(cfg) -> tuple[PairData, dict]:
    """(train PairData, {name: held-out PairData}) from data.blend / data.valid pairs prefixes.

    data.split cuts each blend entry into train/valid pair ranges; data.valid entries are whole held-out sets.
    Blend weights are not used: the train set is the concatenation of the entries."""
    from ..data.datasets import _entry_name, _split_bounds

    if not cfg.data.blend:
        raise ConfigError("data.blend is empty; list preprocessed pairs as [{path: PREFIX, name: NAME}] "
                          "(`jinpan preprocess --format pairs`, or `jinpan data demo` for the demo set)")
    stores, train_ranges, evals = [], [], {}
    for i, entry in enumerate(cfg.data.blend):
        key = f"data.blend[{i}]"
        entry = {"path": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "path" not in entry:
            raise ConfigError(f"{key} must be a mapping {{path: PREFIX, name: NAME}}, got {entry!r}")
        store = PairStore(entry["path"], f"{key}.path")
        (tlo, thi), (vlo, vhi), _ = _split_bounds(cfg.data.split, store.num_pairs)
        stores.append(store)
        train_ranges.append((tlo, thi))
        if vhi > vlo and not cfg.data.valid:
            name = _entry_name(entry, store.prefix)
            evals[name] = PairData(cfg, [store], [(vlo, vhi)], False, name)
    if sum(hi - lo for lo, hi in train_ranges) == 0:
        raise ConfigError(f"data.split={cfg.data.split} leaves no training pairs; give the train split a share")
    train = PairData(cfg, stores, train_ranges, True, "train")
    for i, entry in enumerate(cfg.data.valid or []):
        key = f"data.valid[{i}]"
        entry = {"path": entry} if isinstance(entry, str) else entry
        store = PairStore(entry["path"], f"{key}.path")
        name = _entry_name(entry, store.prefix)
        evals[name] = PairData(cfg, [store], [(0, store.num_pairs)], False, name)
    return train, evals
