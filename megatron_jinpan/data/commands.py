"""CLI for the data area: `jinpan tokenizer train|extend`, `jinpan preprocess`,
`jinpan data clean|dedup|demo`."""
from __future__ import annotations

import json
from pathlib import Path


def _tokenizer_train(args) -> int:
    from .tokenizer import train_tokenizer

    out = train_tokenizer(args.input, args.vocab_size, args.output, character_coverage=args.character_coverage,
                          num_threads=args.threads)
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(out, key="--output")
    print(f"wrote {out} ({tok.vocab_size} pieces; unk=0 bos={tok.bos_id} eos={tok.eos_id})")
    return 0


def _read_heldout(path: str, limit: int = 2000) -> list[str]:
    from .tokenizer import DataError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--heldout {path} does not exist; pass a UTF-8 text or JSONL file")
    texts = []
    with open(p, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                    line = obj.get("text", line) if isinstance(obj, dict) else line
                except json.JSONDecodeError:
                    pass
            texts.append(line)
            if len(texts) >= limit:
                break
    if not texts:
        raise DataError(f"--heldout {path} holds no text")
    return texts


def _tokenizer_extend(args) -> int:
    from .tokenizer import (DataError, extend_tokenizer, frequent_cjk_chars, load_tokenizer, read_chars_file,
                            tokens_per_char)

    if bool(args.chars) == bool(args.corpus):
        raise DataError("pass exactly one of --chars FILE or --corpus TXT")
    pieces = read_chars_file(args.chars) if args.chars else frequent_cjk_chars(args.corpus, args.num_chars)
    heldout = args.heldout or args.corpus
    base = load_tokenizer(args.base, key="--base")
    info = extend_tokenizer(args.base, pieces, args.output)
    new = load_tokenizer(args.output, key="--output")
    print(f"wrote {args.output}: {info['base_vocab']} -> {info['new_vocab']} pieces "
          f"(added {info['added']}, {info['skipped']} already present); existing ids unchanged")
    if heldout:
        texts = _read_heldout(heldout)
        before, after = tokens_per_char(base, texts), tokens_per_char(new, texts)
        print(f"tokens per character on {heldout}: {before:.3f} -> {after:.3f} ({after / before:.2f}x)")
    else:
        print("pass --heldout TXT to see tokens per character before/after")
    print(f"next: set model.vocab_size={info['new_vocab']} and resize the checkpoint's embeddings")
    return 0


def _preprocess_chat(args) -> int:
    from .chat_preprocess import preprocess_chat

    info = preprocess_chat(args.input, args.tokenizer, args.output_prefix, template=args.template or "plain",
                           workers=args.workers, max_seq_len=args.max_seq_len, truncation=args.truncation,
                           progress=not args.no_progress)
    print(f"wrote {info['prefix']}.bin/.idx (+ .mask, .chat.json): kept {info['kept']} conversations "
          f"({info['truncated']} truncated), dropped {info['dropped']} (no assistant turn "
          f"{info['dropped_no_assistant']}, empty {info['dropped_empty']}, over-length {info['dropped_too_long']}); "
          f"{info['tokens']} tokens, {info['answer_tokens']} answer tokens")
    return 0


def _preprocess_pairs(args) -> int:
    from ..posttrain.pairs import preprocess_command

    return preprocess_command(args)


# `jinpan preprocess --format F` handlers; `pairs` (preference data) is registered by the reward model's code.
PREPROCESS_FORMATS = {"chat": _preprocess_chat, "pairs": _preprocess_pairs}


def _preprocess(args) -> int:
    from .tokenizer import DataError

    if args.format != "text":
        if args.format not in PREPROCESS_FORMATS:
            raise DataError(f"--format {args.format} is not available in this build; use text or chat")
        return PREPROCESS_FORMATS[args.format](args)
    if args.template or args.max_seq_len:
        raise DataError("--template/--max-seq-len apply to --format chat|pairs; drop them for plain text")
    from .preprocess import preprocess

    info = preprocess(args.input, args.tokenizer, args.output_prefix, workers=args.workers, json_key=args.json_key,
                      append_eod=args.append_eod, progress=not args.no_progress)
    print(f"wrote {info['prefix']}.bin/.idx: {info['documents']} documents, {info['tokens']} tokens ({info['dtype']})")
    return 0


def _print_report(report: dict, path: str | None) -> None:
    print(json.dumps(report, ensure_ascii=False, indent=2))
    if path:
        Path(path).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")


def _clean(args) -> int:
    from .quality import clean_jsonl

    report = clean_jsonl(args.input, args.output, json_key=args.json_key, min_chars=args.min_chars,
                         max_chars=args.max_chars, langs=[s.strip() for s in args.langs.split(",") if s.strip()],
                         min_lang_ratio=args.min_lang_ratio, workers=args.workers, progress=not args.no_progress)
    _print_report(report, args.stats)
    return 0


def _dedup(args) -> int:
    from .quality import dedup_jsonl

    report = dedup_jsonl(args.input, args.output, json_key=args.json_key, threshold=args.threshold,
                         num_perm=args.num_perm, bands=args.bands, ngram=args.ngram, workers=args.workers,
                         progress=not args.no_progress, exact_only=args.exact_only)
    _print_report(report, args.stats)
    return 0


def _demo(args) -> int:
    from .demo import build_demo

    paths = build_demo(args.output, docs_per_domain=args.docs_per_domain, seed=args.seed, workers=args.workers,
                       extension=not args.no_extension)
    print(f"demo data ready under {args.output}: tokenizer {paths['tokenizer']}")
    for d, p in paths["train"].items():
        print(f"  {d}: train {p}  valid {paths['valid'][d]}")
    return 0


def register(subparsers) -> None:
    # tokenizer
    tok = subparsers.add_parser("tokenizer", help="train or extend a sentencepiece tokenizer")
    tsub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    p = tsub.add_parser("train", help="train a LLaMA-style BPE tokenizer (byte fallback, split digits)")
    p.add_argument("--input", required=True, nargs="+", help="UTF-8 text file(s), one sentence/document per line")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output", required=True, help="output T.model (a T.vocab is written beside it)")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_tokenizer_train)
    p = tsub.add_parser("extend", help="append pieces (e.g. Chinese characters) without changing existing ids")
    p.add_argument("--base", required=True, help="sentencepiece .model to extend")
    p.add_argument("--chars", help="file with one character/word per line to add")
    p.add_argument("--corpus", help="text file: add its --num-chars most frequent Chinese characters")
    p.add_argument("--num-chars", type=int, default=7000)
    p.add_argument("--output", required=True)
    p.add_argument("--heldout", help="text/JSONL to report tokens per character before/after (default: --corpus)")
    p.set_defaults(func=_tokenizer_extend)

    # preprocess
    p = subparsers.add_parser("preprocess", help="tokenize JSONL into a Megatron .bin/.idx dataset")
    p.add_argument("--input", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--json-key", default="text")
    p.add_argument("--append-eod", action="store_true", help="append the eos id after each document")
    p.add_argument("--format", choices=("text", "chat", "pairs"), default="text",
                   help="text: one document per line; chat: one conversation per line (messages/conversations/"
                        "alpaca) -> ids + answer-only loss mask; pairs: prompt/chosen/rejected")
    p.add_argument("--template", help="chat template: plain | llama2 | a Jinja file or string (default plain)")
    p.add_argument("--max-seq-len", type=int, help="chat: longest conversation in tokens (see --truncation)")
    p.add_argument("--truncation", choices=("right", "drop"), default="right",
                   help="chat: cut an over-length conversation to its first tokens, or drop it")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_preprocess)

    # data
    data = subparsers.add_parser("data", help="corpus tools: clean, dedup, demo")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = dsub.add_parser("clean", help="normalise, filter by length/language, report zh/en stats")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--json-key", default="text")
    p.add_argument("--min-chars", type=int, default=10, help="drop documents with fewer non-space characters")
    p.add_argument("--max-chars", type=int, default=1_000_000)
    p.add_argument("--langs", default="zh,en", help="languages to keep (zh, en)")
    p.add_argument("--min-lang-ratio", type=float, default=0.5,
                   help="drop documents whose share of characters in --langs is below this")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--stats", help="also write the report as JSON here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_clean)
    p = dsub.add_parser("dedup", help="remove exact and MinHash near-duplicate documents")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--json-key", default="text")
    p.add_argument("--threshold", type=float, default=0.8, help="estimated Jaccard similarity for near duplicates")
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--bands", type=int, default=16)
    p.add_argument("--ngram", type=int, default=5, help="character shingle size")
    p.add_argument("--exact-only", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--stats", help="also write the report as JSON here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_dedup)
    p = dsub.add_parser("demo", help="generate the bilingual finance demo corpus, tokenizer and datasets")
    p.add_argument("--output", default="data/demo")
    p.add_argument("--docs-per-domain", type=int, default=4000)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-extension", action="store_true", help="skip the English tokenizer + extension assets")
    p.set_defaults(func=_demo)
