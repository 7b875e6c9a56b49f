"""Tiny models, tokenizers and data for the eval tests (built in tmp dirs; nothing downloaded).

    from eval_fixtures import tokenizer, hf_and_ours, trained_run, exam_dir
"""
from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import torch

WORDS = ("the market rose fell profit revenue bank stock bond rate yes no good bad 营业 收入 增长 利润 银行 股票 "
         "债券 利率 公司 市场 答案 问题 积极 消极 上涨 下跌").split()


def text_lines(n: int, seed: int = 0, words: int = 12) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(words)) for _ in range(n)]


def tokenizer(root: Path) -> Path:
    """A 320-piece sentencepiece model (byte fallback) trained on the toy vocabulary."""
    from megatron_jinpan.data.tokenizer import train_tokenizer

    path = root / "tok" / "tokenizer.model"
    if not path.exists():
        (root / "tok").mkdir(parents=True, exist_ok=True)
        (root / "tok" / "corpus.txt").write_text("\n".join(text_lines(2000)), encoding="utf-8")
        train_tokenizer(root / "tok" / "corpus.txt", 320, path, num_threads=1)
    return path


def hf_and_ours(root: Path, layers: int = 4, seed: int = 0) -> tuple[Path, Path]:
    """(our checkpoint, its HF conversion by `jinpan convert mj-to-hf`) of a random LLaMA with the toy tokenizer."""
    import transformers

    from megatron_jinpan.checkpoint.convert import hf_to_mj, mj_to_hf

    tok = tokenizer(root)
    ours, hf = root / "ckpt", root / "hf"
    if hf.exists():
        return ours, hf
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # a sharper, less uniform output distribution than the init's
        model.lm_head.weight.mul_(5.0)
    src = root / "hf_src"
    model.save_pretrained(src)
    shutil.copy(tok, src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    hf_to_mj(src, ours, tp=2, pp=2, progress=False)
    mj_to_hf(ours, hf, progress=False)
    return ours, hf


def exam_dir(root: Path, subjects=("accounting", "banking"), n_val: int = 5, n_dev: int = 2, seed: int = 0) -> Path:
    """A C-Eval-style CSV exam: dev/ and val/ with one file per subject (an explanation column too)."""
    r = random.Random(seed)
    zh = [w for w in WORDS if not w.isascii()]
    d = root / "exam"
    for subject in subjects:
        for split, n in (("dev", n_dev), ("val", n_val)):
            (d / split).mkdir(parents=True, exist_ok=True)
            with open(d / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
                for i in range(n):
                    w.writerow([i, "".join(r.choice(zh) for _ in range(3)) + "是什么？",
                                *[r.choice(zh) for _ in range(4)], r.choice("ABCD"), "因为"])
    return d


def domain_data(root: Path) -> dict[str, Path]:
    """Preprocessed train/valid prefixes of two toy domains: {"zh_train", "zh_valid", "en_train", "en_valid"}."""
    from megatron_jinpan.data.preprocess import preprocess

    tok = tokenizer(root)
    out = {}
    for k, (domain, seed) in enumerate((("zh", 1), ("en", 2))):
        for split, n in (("train", 60), ("valid", 9)):
            jsonl = root / "data" / f"{domain}_{split}.jsonl"
            prefix = root / "data" / f"{domain}_{split}"
            if not prefix.with_suffix(".idx").exists():
                jsonl.parent.mkdir(parents=True, exist_ok=True)
                lines = text_lines(n, seed=seed * 100 + (split == "valid"), words=8 + 4 * k)
                jsonl.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in lines) + "\n")
                preprocess(str(jsonl), str(tok), str(prefix), append_eod=True, progress=False)
            out[f"{domain}_{split}"] = prefix
    return out


def trained_run(root: Path, steps: int = 2, extra: list[str] = (), name: str = "run") -> tuple[Path, list[dict]]:
    """A tiny pretraining run with two held-out sets evaluated at its last step: (run dir, metrics records)."""
    from megatron_jinpan.config import load_config
    from megatron_jinpan.training.loop import pretrain

    tok = tokenizer(root)
    data = domain_data(root)
    run = root / name
    overrides = [
        "model.name=debug", "model.vocab_size=320", f"data.tokenizer={tok}", "train.device=cpu",
        f"data.blend=[{{path: {data['zh_train']}, name: zh}}, {{path: {data['en_train']}, name: en}}]",
        f"data.valid=[{{path: {data['zh_valid']}, name: zh}}, {{path: {data['en_valid']}, name: en}}]",
        f"train.steps={steps}", "train.global_batch=4", "train.micro_batch=2", "train.seq_len=32",
        f"train.eval_interval={steps}", "train.eval_iters=2", "optim.lr=1e-2", "optim.warmup=0",
        "log.progress=false", "log.tensorboard=false", "checkpoint.resume=never", f"run_dir={run}", *extra,
    ]
    result = pretrain(load_config(None, overrides))
    return run, result.records
