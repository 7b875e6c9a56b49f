"""Supervised fine-tuning: a data source and a loss for the one training loop (not a second trainer).

    jinpan sft --config configs/sft/tiny_stage1.yaml --nproc 2
    torchrun --nproc-per-node 8 -m megatron_jinpan sft --config configs/sft/llama7b_stage1.yaml

    from megatron_jinpan.training.loop import pretrain
    from megatron_jinpan.posttrain.sft import sft_task
    pretrain(cfg, make_task=sft_task)

- Data: `data.blend` mixes chat datasets (`jinpan preprocess --format chat`: loss on answer
  tokens only) and pretraining text (loss on every token), with weights and
  `data.blend_schedule` as in pretraining (data/sft_datasets.py); `sft.packing` packs
  conversations into rows with per-conversation attention.
- Loss: the mean over the global batch's loss tokens, whatever the layout (the loop divides the
  summed loss by the global count). metrics.jsonl adds `answer_tokens` (answer tokens in the
  step's global batch), `answer_loss` (the loss on them alone; equal to `loss` without text
  data) and `loss_tokens`; held-out sets give `eval_loss_<set>` on their answer tokens.
- `train.eval_generate`: a held-out chat JSONL whose last assistant turn is the reference;
  at each eval the model answers every prompt greedily (posttrain/generation.py, on the
  training layout) -> `eval_exact_match` and `eval_contains` (fractions of prompts).
- Weights come from `checkpoint.load` (one of our checkpoints, any layout, or a Hugging Face
  directory); resume, checkpoints and TensorBoard are the pretraining loop's.
"""
from __future__ import annotations

import functools
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError
from ..parallel.tensor import vocab_parallel_cross_entropy
from ..training.task import Task


# ---------------------------------------------------------------- loss and summary
def _sft_loss(output, mb, *, vocab_size: int, mesh):
    losses = vocab_parallel_cross_entropy(output, mb["labels"], vocab_size, mesh)
    mask = mb["loss_mask"].to(losses.dtype)
    answer = mask * mb["is_chat"].to(losses.dtype)[:, None]
    return (losses * mask).sum(), {"loss_tokens": mask.sum(), "answer_tokens": answer.sum(),
                                   "answer_loss": (losses.detach() * answer).sum()}


def sft_loss(vocab_size: int, mesh):
    """loss_fn for forward_backward: summed cross-entropy over loss tokens (+ answer-token sums)."""
    return functools.partial(_sft_loss, vocab_size=vocab_size, mesh=mesh)


def sft_summary(sums: dict, units: float, for_eval: bool) -> dict:
    loss = sums["loss"] / max(units, 1.0)
    if for_eval:
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
    answers = sums.get("answer_tokens", 0.0)
    return {"loss": loss, "loss_tokens": sums.get("loss_tokens", units), "answer_tokens": answers,
            "answer_loss": sums["answer_loss"] / answers if answers else None}


# ---------------------------------------------------------------- generation eval
@dataclass
class GenerationExample:
    prompt: list[int]
    reference: str
    where: str
    group: str | None = None  # the line's "domain" field, if any: also reported per group


def normalize_answer(text: str) -> str:
    """Compare answers modulo case, width (full/half-width digits), spacing and trailing full stops."""
    text = unicodedata.normalize("NFKC", text).casefold().strip()
    text = re.sub(r"\s+", " ", text)
    return text.rstrip("。.!！ ").strip()


def load_generation_examples(path: str, template, tokenizer, max_len: int, max_new_tokens: int,
                             limit: int = 0) -> list[GenerationExample]:
    """Prompts (everything before the last assistant turn, + the assistant header) and references
    (that turn's text) from a chat JSONL."""
    from .chat import read_jsonl, to_messages

    if not Path(path).is_file():
        raise ConfigError(f"train.eval_generate={path} does not exist; pass a chat JSONL whose last assistant "
                          "turn is the reference answer (e.g. data/demo/sft/heldout.jsonl)")
    out = []
    for where, record in read_jsonl(path):
        messages = to_messages(record, where)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or not messages[last]["content"].strip():
            raise ConfigError(f"{where}: train.eval_generate needs a reference answer (a non-empty last "
                              "assistant turn) on every line")
        prompt = template.encode_prompt(messages[:last], tokenizer, where)
        if len(prompt) + max_new_tokens > max_len:
            raise ConfigError(f"{where}: the prompt has {len(prompt)} tokens + sft.eval_max_new_tokens="
                              f"{max_new_tokens} > model.max_seq_len={max_len}; shorten it or lower "
                              "sft.eval_max_new_tokens")
        group = record.get("domain")
        out.append(GenerationExample(prompt, messages[last]["content"], where,
                                     str(group) if isinstance(group, (str, int)) else None))
        if limit and len(out) >= limit:
            break
    if not out:
        raise ConfigError(f"train.eval_generate={path} holds no examples")
    return out


def generation_accuracy(chunks, mesh, examples: list[GenerationExample], tokenizer, max_new_tokens: int,
                        autocast=None) -> dict:
    """Greedy answers to `examples` -> eval_exact_match / eval_contains over all of them, and
    eval_exact_match_<group> per `domain` group when the examples have one (each DP replica answers
    its share; the counts are summed over DP). Same result on every rank."""
    from ..parallel import comm
    from .generation import generate

    groups = sorted({e.group for e in examples if e.group is not None})
    mine = examples[mesh.dp_rank::mesh.dp]
    out = generate(chunks, mesh, [e.prompt for e in mine], max_new_tokens=max_new_tokens, greedy=True,
                   eos_id=tokenizer.eos_id, autocast=autocast)
    # rows: all, then each group; columns: exact, contains, count
    counts = torch.zeros(1 + len(groups), 3, dtype=torch.float64, device=mesh.device)
    for example, response in zip(mine, out.responses):
        # ids past the tokenizer (the model's padded vocab rows) cannot be decoded; they are never right
        ids = [t for t in response if t != tokenizer.eos_id and 0 <= t < tokenizer.vocab_size]
        answer, reference = normalize_answer(tokenizer.decode(ids)), normalize_answer(example.reference)
        row = torch.tensor([answer == reference, reference in answer, 1], dtype=torch.float64)
        counts[0] += row
        if example.group is not None:
            counts[1 + groups.index(example.group)] += row
    comm.all_reduce(counts, mesh.dp_group)
    result = {"eval_exact_match": float(counts[0, 0] / counts[0, 2]), "eval_contains": float(counts[0, 1] / counts[0, 2])}
    for i, group in enumerate(groups, 1):
        result[f"eval_exact_match_{group}"] = float(counts[i, 0] / counts[i, 2])
    return result


# ---------------------------------------------------------------- the task
def check_sft_config(cfg) -> None:
    """Everything about the SFT inputs that can fail, checked before any process starts."""
    from ..data.sft_datasets import build_sft_eval_data, build_sft_train_data
    from .chat import load_template

    load_template(cfg.sft.template)
    if cfg.train.eval_generate and cfg.train.eval_interval <= 0:
        raise ConfigError("train.eval_generate runs at each evaluation; set train.eval_interval > 0 "
                          "(e.g. train.eval_interval=50)")
    if cfg.train.eval_generate:
        _generation_examples(cfg)
    build_sft_train_data(cfg)
    if cfg.train.eval_interval > 0:
        build_sft_eval_data(cfg)


def _generation_examples(cfg) -> tuple[list[GenerationExample], object]:
    from ..data.tokenizer import load_tokenizer
    from .chat import load_template

    tok = load_tokenizer(cfg.data.tokenizer)
    examples = load_generation_examples(cfg.train.eval_generate, load_template(cfg.sft.template), tok,
                                        cfg.model.max_seq_len, cfg.sft.eval_max_new_tokens, cfg.sft.eval_samples)
    return examples, tok


def sft_task(cfg, mesh) -> Task:
    """The SFT objective for `training.loop.pretrain(cfg, make_task=sft_task)`."""
    from .. import device as devices
    from ..data.sft_datasets import build_sft_eval_data, build_sft_train_data

    eval_sets = build_sft_eval_data(cfg) if cfg.train.eval_interval > 0 else {}
    extra_eval = None
    if cfg.train.eval_generate:
        examples, tok = _generation_examples(cfg)
        autocast = lambda: devices.autocast_context(mesh.device, cfg.train.dtype)  # noqa: E731

        def extra_eval(chunks, mesh):
            return generation_accuracy(chunks, mesh, examples, tok, cfg.sft.eval_max_new_tokens, autocast)

    return Task(name="sft", train_data=build_sft_train_data(cfg), eval_sets=eval_sets,
                loss_fn=sft_loss(cfg.model.vocab_size, mesh), summarize=sft_summary, extra_eval=extra_eval)
