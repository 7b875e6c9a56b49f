"""`jinpan reward`, `jinpan reward score` and `jinpan dpo`: preference training on the shared loop.

    jinpan reward --config configs/reward/tiny.yaml [--nproc 8] [key=value ...]
    jinpan reward score --checkpoint runs/reward_tiny --input answers.jsonl --output scored.jsonl \
        [--template plain] [--batch-size 8] [--nproc 4 --tp 2 --pp 2]
    jinpan dpo --config configs/dpo/tiny.yaml [--nproc 8] [key=value ...]

Training commands run under torchrun too (`torchrun --nproc-per-node 8 -m megatron_jinpan reward ...`).
`reward score` input lines: {"prompt", "response"}, {"messages": [...]} (ending with the answer), or a
pair {"prompt", "chosen", "rejected"} / {"chosen": [...], "rejected": [...]}; each output line is the
input record plus "reward" (or "reward_chosen"/"reward_rejected"), and "reward_normalized" versions when
the checkpoint records a normalisation (reward.normalize).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from ..training.commands import add_training_command, launch


def _reward_entry(cfg) -> None:
    from .reward import train_reward

    train_reward(cfg)


def _dpo_entry(cfg) -> None:
    from .dpo import train_dpo

    train_dpo(cfg)


def cmd_reward(args) -> int:
    from ..config import load_config

    overrides = list(args.overrides)
    if overrides and overrides[0] == "score":
        if len(overrides) > 1:
            raise ValueError(f"jinpan reward score takes options only, got {overrides[1:]}")
        return cmd_score(args)
    if not args.config:
        raise ValueError("jinpan reward needs --config configs/reward/F.yaml (or `jinpan reward score ...`)")
    from .reward import reward_config

    cfg = reward_config(load_config(args.config, overrides))
    launch(cfg, _reward_entry, args.nproc)
    return 0


def cmd_dpo(args) -> int:
    from ..config import load_config

    if not args.config:
        raise ValueError("jinpan dpo needs --config configs/dpo/F.yaml")
    cfg = load_config(args.config, list(args.overrides))
    launch(cfg, _dpo_entry, args.nproc)
    return 0


# ---------------------------------------------------------------- reward score
def cmd_score(args) -> int:
    import dataclasses

    from ..checkpoint.load import model_config_of
    from ..config import Config, ConfigError

    missing = [f"--{k.replace('_', '-')}" for k in ("checkpoint", "input", "output") if not getattr(args, k)]
    if missing:
        raise ConfigError(f"jinpan reward score needs {', '.join(missing)}")
    if not Path(args.input).is_file():
        raise FileNotFoundError(f"--input {args.input} does not exist; pass a JSONL file of prompts and responses")
    model = model_config_of(args.checkpoint)
    if model.head != "value":
        raise ConfigError(f"--checkpoint {args.checkpoint} has no value head (model.head={model.head}); score needs "
                          "a reward model: train one with `jinpan reward` or convert an HF "
                          "LlamaForSequenceClassification with `jinpan convert hf-to-mj --task reward`")
    if Path(args.output).exists():
        raise ConfigError(f"--output {args.output} exists; choose a new file (nothing is overwritten)")
    # Read and encode everything here, so a bad line fails with its file and line before any worker starts.
    from ..checkpoint.commands import _find_tokenizer
    from .chat import load_template, read_jsonl
    from .reward import score_texts

    tok = _find_tokenizer(args.checkpoint, args.tokenizer)
    template = load_template(args.template)
    records = [record for _, record in read_jsonl(args.input)]
    jobs, truncated = [], 0
    for i, (where, record) in enumerate(read_jsonl(args.input)):
        for key, ids in score_texts(record, where, template, tok).items():
            if len(ids) > model.max_seq_len:  # keep the answer: drop the oldest prompt tokens
                ids, truncated = ids[-model.max_seq_len:], truncated + 1
            jobs.append((i, key, ids))
    world = int(os.environ.get("WORLD_SIZE", args.nproc))
    dp = max(world // (args.tp * args.pp), 1)
    cfg = Config(model=model)
    cfg.parallel = dataclasses.replace(cfg.parallel, tp=args.tp, pp=args.pp)
    cfg.train = dataclasses.replace(cfg.train, global_batch=dp, micro_batch=1, seq_len=min(64, model.max_seq_len))
    options = {"checkpoint": args.checkpoint, "output": args.output, "batch_size": args.batch_size,
               "records": records, "jobs": jobs, "truncated": truncated}
    launch(cfg, functools.partial(_score_worker, options), args.nproc)
    return 0


def _score_worker(options: dict, cfg) -> None:
    from .. import device as devices
    from ..checkpoint.load import load_parallel_model
    from ..parallel import comm
    from ..parallel.mesh import ParallelMesh
    from .reward import normalization_of, score_sequences

    mesh = ParallelMesh.create(cfg.parallel.tp, cfg.parallel.pp, devices.resolve_device(cfg.train.device))
    try:
        records, jobs = options["records"], options["jobs"]
        mine = jobs[mesh.dp_rank::mesh.dp]  # this replica's share
        _, chunks = load_parallel_model(options["checkpoint"], mesh, cfg)
        scores = score_sequences(chunks, mesh, [ids for _, _, ids in mine], batch_size=options["batch_size"],
                                 schedule=cfg.parallel.pp_schedule)
        found = [(i, key, s) for (i, key, _), s in zip(mine, scores)]
        parts = comm.all_gather_object(found if (mesh.tp_rank == 0 and mesh.pp_rank == 0) else [])
        if mesh.rank == 0:
            merged: dict = {}
            for part in parts:
                for i, key, s in part:
                    merged.setdefault(i, {})[key] = s
            norm = normalization_of(options["checkpoint"])
            out = Path(options["output"])
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            with open(tmp, "w", encoding="utf-8") as fh:
                for i, record in enumerate(records):
                    row = dict(record)
                    for key, s in merged[i].items():
                        row[key] = s
                        if norm and norm.get("std"):
                            row[key + "_normalized"] = (s - norm["mean"]) / norm["std"]
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(tmp, out)
            n = options["truncated"]
            note = f"; {n} longer than model.max_seq_len kept their last tokens" if n else ""
            print(f"wrote {out}: {len(records)} records, {len(jobs)} responses scored{note}", flush=True)
        mesh.barrier()
    finally:
        mesh.destroy()


def register(subparsers) -> None:
    p = add_training_command(
        subparsers, "reward", cmd_reward, help="train a pairwise reward model, or `reward score` with one",
        description="Train per a YAML recipe (trailing key=value items override it), or "
                    "`jinpan reward score --checkpoint C --input X.jsonl --output Y.jsonl`.",
        config_example="configs/reward/tiny.yaml", overrides_example="parallel.tp=2 train.steps=100")
    g = p.add_argument_group("reward score")
    g.add_argument("--checkpoint", help="score: reward model (our checkpoint / run dir, or an HF "
                   "LlamaForSequenceClassification dir)")
    g.add_argument("--input", help="score: JSONL of {prompt, response} / {messages} / pairs")
    g.add_argument("--output", help="score: JSONL to write (a new file)")
    g.add_argument("--template", default="plain", help="score: chat template (plain | llama2 | Jinja file/string)")
    g.add_argument("--tokenizer", default=None, help="score: tokenizer (default: the checkpoint's)")
    g.add_argument("--batch-size", type=int, default=8, help="score: sequences per forward micro-batch")
    g.add_argument("--tp", type=int, default=1, help="score: tensor-parallel size")
    g.add_argument("--pp", type=int, default=1, help="score: pipeline-parallel size")

    add_training_command(subparsers, "dpo", cmd_dpo, help="Direct Preference Optimization on preference pairs",
                         description="Train per a YAML recipe; trailing key=value items override it.",
                         config_example="configs/dpo/tiny.yaml", overrides_example="dpo.beta=0.1 train.steps=100")
