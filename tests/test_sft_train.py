"""SFT on the training engine: answer-only loss, packing, layout equivalence, resume, config errors.

    python -m pytest -q tests/test_sft_train.py

Data: a tiny tokenizer, a chat dataset of arithmetic questions (single and multi-turn) and a
pretraining text dataset, all built here; the `debug` model.
"""
import json
import os
import random
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from megatron_jinpan.config import ConfigError, load_config
from megatron_jinpan.data.sft_datasets import ChatRow, build_sft_train_data, chat_row, collate_rows
from megatron_jinpan.data.tokenizer import load_tokenizer, train_tokenizer
from megatron_jinpan.parallel.local import free_port, set_worker_env
from megatron_jinpan.posttrain import sft


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sftdata")
    rng = random.Random(0)
    chats, texts = [], []
    for i in range(120):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        turns = [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]
        if i % 3 == 0:  # multi-turn
            turns += [{"role": "user", "content": f"And {a} minus {b}?"}, {"role": "assistant", "content": str(a - b)}]
        chats.append({"messages": turns})
        texts.append({"text": f"The revenue of company {i} grew {a}% to {b}.5 billion yuan; 营业收入增长{a}%。"})
    (d / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (d / "text.jsonl").write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts))
    (d / "held.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats[:4]))
    (d / "all.txt").write_text("\n".join(f"Human: {c['messages'][0]['content']}\n\nAssistant: {c['messages'][1]['content']}"
                                         for c in chats) + "\n" + "\n".join(t["text"] for t in texts))
    train_tokenizer(d / "all.txt", 400, d / "t.model")
    from megatron_jinpan.cli import main

    assert main(["preprocess", "--format", "chat", "--input", str(d / "chat.jsonl"), "--tokenizer", str(d / "t.model"),
                 "--output-prefix", str(d / "chat"), "--no-progress"]) == 0
    assert main(["preprocess", "--input", str(d / "text.jsonl"), "--tokenizer", str(d / "t.model"),
                 "--output-prefix", str(d / "text"), "--append-eod", "--no-progress"]) == 0
    vocab = load_tokenizer(d / "t.model").vocab_size
    base = [
        "model.name=debug", f"model.vocab_size={vocab}", f"data.tokenizer={d / 't.model'}",
        f"data.blend=[{{path: {d / 'chat'}, weight: 3, name: chat}}, {{path: {d / 'text'}, weight: 1, name: text}}]",
        "data.split=90,10,0", "train.steps=2", "train.global_batch=8", "train.micro_batch=2", "train.seq_len=48",
        "train.device=cpu", "optim.lr=3e-3", "optim.warmup=1", "optim.min_lr=3e-4", "log.progress=false",
        "log.tensorboard=false", "checkpoint.resume=never", "checkpoint.save_on_exit=false",
    ]
    return types.SimpleNamespace(dir=d, base=base, vocab=vocab)


def _model(cfg):
    from megatron_jinpan.models import Llama

    torch.manual_seed(0)
    return Llama(cfg.model)


def _loss(model, mb, vocab):
    logits = model(mb["tokens"], position_ids=mb["position_ids"], cu_seqlens=mb.get("cu_seqlens"))
    if logits.requires_grad:
        logits.retain_grad()
    loss, metrics = sft._sft_loss(logits, mb, vocab_size=vocab, mesh=None)
    return loss, metrics, logits


def test_prompt_tokens_carry_no_loss_and_no_gradient(data):
    cfg = load_config(None, data.base + ["run_dir=" + str(data.dir / "r0")])
    mb = build_sft_train_data(cfg).microbatches(0)[0]
    assert 0 < mb["loss_mask"].sum() < mb["loss_mask"].numel()
    model = _model(cfg)
    loss, metrics, logits = _loss(model, mb, data.vocab)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    masked = mb["loss_mask"] == 0
    assert torch.count_nonzero(logits.grad[masked]) == 0  # no gradient flows from masked positions
    # the prompt/padding tokens as targets: any other ids give the same loss and the same gradients
    other = dict(mb, labels=torch.where(masked, torch.randint_like(mb["labels"], data.vocab), mb["labels"]))
    assert not torch.equal(other["labels"], mb["labels"])
    model.zero_grad()
    loss2, _, _ = _loss(model, other, data.vocab)
    loss2.backward()
    assert loss2.item() == loss.item()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    # answer_tokens counts chat rows' loss tokens only
    chat_rows = mb["is_chat"].bool()
    assert metrics["answer_tokens"] == mb["loss_mask"][chat_rows].sum()


def test_packed_loss_equals_sum_of_conversation_losses(data):
    cfg = load_config(None, data.base + ["run_dir=" + str(data.dir / "r1"), f"data.blend=[{data.dir / 'chat'}]",
                                        "train.seq_len=96"])
    source = build_sft_train_data(cfg).sources[0]
    row = source.sample(3)
    assert len(row.pieces) >= 2  # several conversations share the row
    model = _model(cfg)
    with torch.no_grad():
        packed = collate_rows([row], cfg.train.seq_len, False, segments=True)
        assert packed["cu_seqlens"].tolist()[:len(row.pieces)] == [0] + list(
            torch.tensor([len(ids) - 1 for ids, _ in row.pieces]).cumsum(0)[:-1].tolist())
        total, metrics, _ = _loss(model, packed, data.vocab)
        alone = [_loss(model, collate_rows([ChatRow([p])], cfg.train.seq_len, False, segments=False), data.vocab)
                 for p in row.pieces]
    torch.testing.assert_close(total, sum(a[0] for a in alone), rtol=1e-5, atol=1e-5)
    assert metrics["answer_tokens"] == sum(a[1]["answer_tokens"] for a in alone) == sum(
        int(m[1:].sum()) for _, m in row.pieces)
    # position ids restart per conversation
    tokens, labels, mask, pos, starts = chat_row(row, cfg.train.seq_len)
    assert all(pos[s] == 0 for s in starts) and len(starts) >= len(row.pieces)


def _worker(rank, world, port, overrides, out_path):
    set_worker_env(rank, world, port)
    torch.set_num_threads(1)
    from megatron_jinpan.parallel.parallelize import gather_full_state_dict
    from megatron_jinpan.training.loop import pretrain

    result = pretrain(load_config(None, overrides), keep_mesh=True, make_task=sft.sft_task)
    params = gather_full_state_dict(result.chunks, result.mesh)
    if result.mesh.is_logging_rank:
        torch.save({"records": result.records, "params": params}, out_path)
    result.mesh.barrier()
    result.mesh.destroy()


def _run(overrides, nproc, out_path):
    if nproc == 1:
        from megatron_jinpan.parallel.parallelize import gather_full_state_dict
        from megatron_jinpan.training.loop import pretrain

        result = pretrain(load_config(None, overrides), keep_mesh=True, make_task=sft.sft_task)
        params = gather_full_state_dict(result.chunks, result.mesh)
        result.mesh.destroy()
        return {"records": result.records, "params": params}
    mp.spawn(_worker, args=(nproc, free_port(), overrides, out_path), nprocs=nproc, join=True)
    return torch.load(out_path, weights_only=False)


KEYS = ("loss", "answer_tokens", "loss_tokens", "answer_loss", "grad_norm")


def test_sft_step_222_sp_zero1_equals_one_process(data, tmp_path):
    """Chat + text blend, packed rows: (tp, pp, dp) = (2, 2, 2) with SP and ZeRO-1 == one process."""
    common = data.base + ["train.eval_interval=2", "train.eval_iters=1"]
    ref = _run(common + [f"run_dir={tmp_path / 'a'}"], 1, None)
    par = _run(common + [f"run_dir={tmp_path / 'b'}", "parallel.tp=2", "parallel.pp=2", "parallel.sp=true",
                         "parallel.zero=1"], 8, str(tmp_path / "b.pt"))
    assert len(ref["records"]) == len(par["records"]) == 2
    for r, p in zip(ref["records"], par["records"]):
        assert r["answer_tokens"] > 0 and r["loss_tokens"] > r["answer_tokens"]  # both kinds in the batch
        for k in KEYS + ("eval_loss_chat", "eval_loss_text"):
            if k in r or k in p:
                torch.testing.assert_close(torch.tensor(p[k]), torch.tensor(r[k]), rtol=1e-5, atol=1e-6, msg=k)
    assert "eval_loss_chat" in ref["records"][-1]
    # Weights: Adam divides by sqrt(v), so a weight whose gradient is ~0 moves by (rounding noise / |g|) x lr;
    # allow 1% of one step (lr=3e-3) per element — a real layout bug moves weights by O(lr).
    for name, value in ref["params"].items():
        torch.testing.assert_close(par["params"][name], value, rtol=1e-5, atol=3e-5, msg=lambda m: f"{name}: {m}")


def test_resume_is_exact_and_eval_generate_reports(data, tmp_path):
    common = data.base + ["train.steps=4", "sft.packing=false", "optim.schedule=cosine"]
    a = _run(common + [f"run_dir={tmp_path / 'a'}", "checkpoint.interval=2", "train.eval_interval=4",
                       f"train.eval_generate={data.dir / 'held.jsonl'}", "sft.eval_max_new_tokens=4"], 1, None)
    b = _run(common + [f"run_dir={tmp_path / 'b'}", f"checkpoint.resume={tmp_path / 'a'}/checkpoints/step_0000002"],
             1, None)
    assert [r["loss"] for r in b["records"]] == [r["loss"] for r in a["records"]][2:]
    for name, value in a["params"].items():
        assert torch.equal(b["params"][name], value), name
    last = a["records"][-1]
    assert 0.0 <= last["eval_exact_match"] <= last["eval_contains"] <= 1.0


def test_generation_accuracy_counts_exact_and_contained_answers(monkeypatch):
    from megatron_jinpan.posttrain import generation

    tok = types.SimpleNamespace(eos_id=2, vocab_size=100, decode=lambda ids: " ".join(str(i) for i in ids))
    examples = [sft.GenerationExample([1], "7", "a", "finance"), sft.GenerationExample([1], "8", "b", "general"),
                sft.GenerationExample([1], "9", "c", "general")]
    replies = [[7, 2], [5, 8, 2], [3, 150, 2]]  # exact; contains only; wrong (150: a padded-vocab id, dropped)
    monkeypatch.setattr(generation, "generate", lambda *a, **k: generation.GenerationOutput(replies, [], []))
    mesh = types.SimpleNamespace(dp_rank=0, dp=1, dp_group=None, device=torch.device("cpu"))
    out = sft.generation_accuracy(None, mesh, examples, tok, 4)
    assert out == {"eval_exact_match": pytest.approx(1 / 3), "eval_contains": pytest.approx(2 / 3),
                   "eval_exact_match_finance": 1.0, "eval_exact_match_general": 0.0}
    assert sft.normalize_answer(" 12.5 ") == sft.normalize_answer("１２.５。") == "12.5"


@pytest.mark.parametrize("override,match", [
    ("sft.template=llama2", r"was preprocessed with chat template 'plain' but sft.template='llama2'"),
    ("model.vocab_size=300", r"has \d+ tokens but model.vocab_size=300"),
    ("data.blend=[{path: nowhere/chat}]", r"nowhere/chat.bin does not exist"),
    ("data.blend=[{path: TEXT}]", r"data.blend has no chat dataset"),
    ("train.eval_generate=HELD", r"train.eval_generate runs at each evaluation; set train.eval_interval > 0"),
    ("train.eval_generate=nowhere.jsonl", r"train.eval_generate=nowhere.jsonl does not exist"),
])
def test_bad_sft_config_fails_before_any_process(data, tmp_path, capsys, override, match):
    from megatron_jinpan.cli import main

    override = override.replace("TEXT", str(data.dir / "text")).replace("HELD", str(data.dir / "held.jsonl"))
    extra = ["train.eval_interval=1"] if "nowhere.jsonl" in override else []
    rc = main(["sft", *data.base, f"run_dir={tmp_path / 'r'}", *extra, override])
    assert rc == 2
    import re

    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "r").exists()  # nothing started, nothing written
