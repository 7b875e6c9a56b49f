"""`jinpan generate`: continue prompts with a checkpoint, in one process or on a (tp, pp, dp) layout.

    jinpan generate --checkpoint runs/sft --prompt "What is a bond?" --template plain
    jinpan generate --checkpoint runs/sft --input prompts.jsonl --output answers.jsonl \\
        --nproc 4 --tp 2 --pp 2 --temperature 0.8 --top-p 0.9 --max-new-tokens 128

Decoding is posttrain/generation.py's KV-cache generator on the training
layout (the same code PPO rollouts use). `--input` lines are {"prompt": "..."}
or a conversation (OpenAI `messages`, ShareGPT `conversations`, Alpaca
`instruction`/`input`): with `--template` the conversation up to its last
user turn is rendered with the chat template and the model writes the
assistant's answer; without a template a "prompt" string is used as raw text
after BOS. Output: the completed text for `--prompt`; for `--input`, JSONL
lines {"prompt", "response", "finished", "response_tokens"} to `--output`
(or stdout), in input order. `--temperature 0` (the default) or `--greedy`
decodes greedily.

    from megatron_jinpan.checkpoint.generate import generate
    ids = generate(load_model("runs/sft"), prompt_ids, max_new_tokens=32)   # single device, prompt + new ids
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

import torch

from ..posttrain.generation import GenerationError, check_prompts, check_sampling


def generate(model, prompt_ids: list[int], max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, eos_id: int | None = None, seed: int = 0) -> list[int]:
    """prompt + up to max_new_tokens ids from a single-device Llama (greedy at temperature 0)."""
    from ..posttrain.generation import generate as generate_batch, single_device_mesh

    device = next(model.parameters()).device
    out = generate_batch([model], single_device_mesh(device), [list(prompt_ids)], max_new_tokens=max_new_tokens,
                         greedy=temperature <= 0, temperature=temperature if temperature > 0 else 1.0,
                         top_k=top_k, top_p=top_p, eos_id=eos_id, seed=seed)
    return list(prompt_ids) + out.responses[0]


def _prompt_messages(record: dict, where: str) -> list[dict]:
    """The conversation up to (and including) its last user turn."""
    from ..posttrain.chat import to_messages

    messages = to_messages(record, where)
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise GenerationError(f"{where} has no user turn to answer")
    return messages


def encode_prompt_record(record, where: str, template, tok) -> tuple[str, list[int]]:
    """(prompt text, ids) of one input record: {"prompt": str} or a conversation (needs a template)."""
    if template is not None:
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            messages = [{"role": "user", "content": record["prompt"]}]
        else:
            messages = _prompt_messages(record, where)
        return messages[-1]["content"], template.encode_prompt(messages, tok, where)
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise GenerationError(f"{where}: without a chat template each line needs a \"prompt\" string; "
                              f"set a template (plain|llama2|FILE) to answer conversations")
    ids = tok.encode(record["prompt"])
    if getattr(tok, "bos_id", -1) is not None and tok.bos_id >= 0:
        ids = [tok.bos_id] + ids
    return record["prompt"], ids


def encode_prompts(args, tok) -> list[tuple[str, list[int]]]:
    """(prompt text, ids) for --prompt or each --input line."""
    template = None
    if args.template:
        from ..posttrain.chat import load_template

        template = load_template(args.template)
    if args.input:
        from ..posttrain.chat import read_jsonl

        records = list(read_jsonl(args.input))
    else:
        records = [("--prompt", {"prompt": args.prompt})]
    return [encode_prompt_record(record, where, template, tok) for where, record in records]


def _run(rank, world, port, args, prompts, eos_id):
    """One rank: load the checkpoint on the layout, generate this replica's prompts, rank 0 collects."""
    from .. import device as devices
    from ..parallel import comm
    from ..parallel.local import set_worker_env
    from ..parallel.mesh import ParallelMesh
    from ..posttrain.generation import generate as generate_batch
    from .load import load_parallel_model

    if world > 1 and "WORLD_SIZE" not in os.environ:
        set_worker_env(rank, world, port)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    mesh = ParallelMesh.create(args.tp, args.pp, devices.resolve_device(args.device))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the generations only
            _, chunks = load_parallel_model(args.checkpoint, mesh)
        mine = list(range(len(prompts)))[mesh.dp_rank::mesh.dp]
        out = generate_batch(chunks, mesh, [prompts[i] for i in mine], max_new_tokens=args.max_new_tokens,
                             greedy=args.greedy or args.temperature <= 0,
                             temperature=args.temperature if args.temperature > 0 else 1.0, top_k=args.top_k,
                             top_p=args.top_p, eos_id=eos_id, seed=args.seed + 1000 * mesh.dp_rank)
        results = comm.all_gather_object(list(zip(mine, out.responses, out.finished)), mesh.dp_group)
        merged = sorted(item for part in results for item in part)
        return merged if mesh.rank == 0 else None
    finally:
        mesh.destroy()


def _worker(rank, world, port, args, prompts, eos_id, out_path):
    merged = _run(rank, world, port, args, prompts, eos_id)
    if merged is not None:
        torch.save(merged, out_path)


def cmd_generate(args) -> int:
    from .commands import _find_tokenizer
    from .load import model_config_of

    if bool(args.prompt) == bool(args.input):
        raise GenerationError("pass exactly one of --prompt TEXT or --input PROMPTS.jsonl")
    check_sampling(args.max_new_tokens, args.greedy or args.temperature <= 0, max(args.temperature, 1e-6),
                   args.top_k, args.top_p)
    tok = _find_tokenizer(args.checkpoint, args.tokenizer)
    model_cfg = model_config_of(args.checkpoint)
    encoded = encode_prompts(args, tok)
    texts, prompts = [t for t, _ in encoded], [ids for _, ids in encoded]
    if getattr(tok, "vocab_size", model_cfg.vocab_size) > model_cfg.vocab_size:
        raise GenerationError(f"the tokenizer has {tok.vocab_size} ids but the checkpoint's vocab_size is "
                              f"{model_cfg.vocab_size}; pass the checkpoint's own --tokenizer")
    check_prompts(prompts, model_cfg.vocab_size, model_cfg.max_seq_len, args.max_new_tokens)
    eos_id = tok.eos_id if getattr(tok, "eos_id", -1) is not None and tok.eos_id >= 0 else None
    under_launcher = "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if under_launcher else args.nproc
    if world % (args.tp * args.pp):
        raise GenerationError(f"--nproc {world} is not divisible by --tp {args.tp} x --pp {args.pp}")
    if under_launcher or world == 1:
        merged = _run(int(os.environ.get("RANK", 0)), world, None, args, list(prompts), eos_id)
        if merged is None:
            return 0
    else:
        import tempfile

        import torch.multiprocessing as mp

        from ..parallel.local import free_port

        with tempfile.TemporaryDirectory() as tmp:
            out_path = os.path.join(tmp, "generations.pt")
            mp.spawn(_worker, args=(world, free_port(), args, list(prompts), eos_id, out_path), nprocs=world,
                     join=True)
            merged = torch.load(out_path, weights_only=False)
    if args.prompt:
        sys.stdout.write(args.prompt + tok.decode(_strip_eos(merged[0][1], eos_id)) + "\n")
        return 0
    sink = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for (i, response, finished), text in zip(merged, texts):
            sink.write(json.dumps({"prompt": text, "response": tok.decode(_strip_eos(response, eos_id)),
                                   "finished": finished, "response_tokens": len(response)},
                                  ensure_ascii=False) + "\n")
    finally:
        if args.output:
            sink.close()
    if args.output:
        print(f"wrote {len(merged)} generations to {args.output}")
    return 0


def _strip_eos(ids: list[int], eos_id) -> list[int]:
    return ids[:-1] if ids and eos_id is not None and ids[-1] == eos_id else ids


def add_arguments(g) -> None:
    g.add_argument("--checkpoint", required=True, help="our checkpoint (step dir, checkpoints dir, run dir) or HF dir")
    g.add_argument("--prompt", default=None, help="one prompt (raw text, or the user turn with --template)")
    g.add_argument("--input", default=None, help="JSONL of prompts or conversations, one per line")
    g.add_argument("--output", default=None, help="with --input: write JSONL here (default stdout)")
    g.add_argument("--template", default=None, help="chat template: plain | llama2 | Jinja file/string")
    g.add_argument("--tokenizer", default=None, help="sentencepiece .model or HF tokenizer dir")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    g.add_argument("--greedy", action="store_true", help="argmax decoding (whatever --temperature says)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--nproc", type=int, default=1, help="local worker processes when not under torchrun")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    g.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
