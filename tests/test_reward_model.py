"""Pairwise reward model: pairs data, score position, loss, (2,2,2)+SP+ZeRO-1 equivalence, resume, bad input.

    python -m pytest -q tests/test_reward_model.py
"""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron_jinpan.cli import main
from megatron_jinpan.models import Llama, get_model_config, init_weights
from megatron_jinpan.parallel.local import free_port, set_worker_env
from megatron_jinpan.posttrain.pairs import PairStore, collate_pairs, preprocess_pairs
from megatron_jinpan.posttrain.reward import pair_rewards, pairwise_loss
from reward_fixtures import SKIPPED_LINES, VOCAB, make_tokenizer, pair_records, write_pairs

SEQ = 96


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    tok = make_tokenizer(d)
    write_pairs(d / "pairs.jsonl", pair_records(48), SKIPPED_LINES)
    info = preprocess_pairs(str(d / "pairs.jsonl"), str(tok), str(d / "prefs"), max_seq_len=SEQ, progress=False)
    return d, tok, info


def _base(d, tok, run):
    return ["model.name=debug", f"model.vocab_size={VOCAB}", f"data.tokenizer={tok}", f"data.blend=[{{path: {d}/prefs}}]",
            "data.split=80,20,0", "train.steps=2", "train.global_batch=8", "train.micro_batch=2", f"train.seq_len={SEQ}",
            "train.device=cpu", "train.eval_interval=2", "train.eval_iters=2", "optim.lr=3e-3", "optim.warmup=1",
            # Adam eps well above the tiny gradients of positions that never reach a score, so sign noise of
            # those (fp32 reduction order differs by layout) does not become lr-sized updates.
            "optim.eps=1e-3",
            "log.progress=false", "log.tensorboard=false", "checkpoint.resume=never", "checkpoint.save_on_exit=false",
            "reward.normalize=false", f"run_dir={d}/{run}"]


# ---------------------------------------------------------------- data
def test_preprocess_counts_skips_and_masks(pairs):
    d, tok, info = pairs
    assert info["pairs"] == 48
    assert info["skipped"] == {"empty": 2, "identical": 1, "too_long": 1}
    store = PairStore(str(d / "prefs"))
    from megatron_jinpan.data.tokenizer import load_tokenizer

    t = load_tokenizer(tok)
    for k in range(4):  # each record shape: the mask is exactly the final answer, EOS included
        (c, cm), (r, rm), margin = store.pair(k)
        assert c[-1] == t.eos_id and cm[-1] == 1 and r[-1] == t.eos_id
        answer = t.decode(c[cm > 0].tolist()).strip()
        record = pair_records(48)[k]
        want = record["chosen"] if isinstance(record["chosen"], str) else record["chosen"][-1].get(
            "content", record["chosen"][-1].get("value"))
        assert answer == want.strip()
        assert margin == (0.5 if k % 4 == 1 else 0.0)


@pytest.mark.parametrize("pack", [False, True])
def test_score_read_at_each_sequences_eos(pairs, pack):
    """The batch's value at score_index equals the model's value at the last token of the sequence run
    alone: an off-by-one position (or attention leaking across packed documents) changes it."""
    d, _, _ = pairs
    store = PairStore(str(d / "prefs"))
    import numpy as np

    from megatron_jinpan.posttrain.pairs import pack_groups

    group = pack_groups(np.arange(store.num_pairs), store.lengths, SEQ, 3)[0] if pack else [0, 1, 2]
    items = [store.pair(k) for k in group]
    mb = collate_pairs(items, SEQ, pack, rows=3 if pack else None)
    torch.manual_seed(0)
    model = init_weights(Llama(get_model_config("debug", vocab_size=VOCAB, head="value")), seed=3).eval()
    with torch.no_grad():
        values = model(mb["tokens"], position_ids=mb["position_ids"], cu_seqlens=mb.get("cu_seqlens"))
        chosen, rejected = pair_rewards(values, mb)
        for p, ((c, _), (r, _), _) in enumerate(items):
            for got, ids in ((chosen[p], c), (rejected[p], r)):
                alone = model(torch.as_tensor(ids)[None])[0]
                torch.testing.assert_close(got, alone[-1], rtol=1e-5, atol=1e-5)
                assert not torch.allclose(got, alone[-2], atol=1e-4)  # the neighbouring token differs
    flat = mb["tokens"].reshape(-1)
    assert (flat[mb["score_index"]] == 2).all()  # every score sits on an EOS
    if pack:  # several documents per row (plus padding tails)
        assert mb["tokens"].shape == (3, SEQ) and len(items) >= 2 and len(mb["cu_seqlens"]) > 2 * len(items)


def test_pairwise_loss_matches_formula():
    from types import SimpleNamespace

    values = torch.randn(4, 8)
    mb = {"score_index": torch.tensor([7, 15, 21, 30]), "margin": torch.tensor([0.0, 1.0]),
          "pair_weight": torch.tensor([1.0, 1.0])}
    loss, metrics = pairwise_loss(SimpleNamespace(margin=0.25, use_data_margin=True))(values, mb)
    flat = values.reshape(-1)
    rc, rr = flat[[7, 21]], flat[[15, 30]]
    want = -F.logsigmoid(rc - rr - torch.tensor([0.25, 1.25])).sum()
    torch.testing.assert_close(loss, want)
    assert metrics["accuracy"].item() == float((rc > rr).sum())
    torch.testing.assert_close(metrics["reward_margin"], (rc - rr).sum())


# ---------------------------------------------------------------- equivalence and resume
def _worker(rank, world, port, overrides, out_path):
    set_worker_env(rank, world, port)
    torch.set_num_threads(1)
    from megatron_jinpan.config import load_config
    from megatron_jinpan.parallel.parallelize import gather_full_state_dict
    from megatron_jinpan.posttrain.reward import reward_config, reward_task
    from megatron_jinpan.training.loop import pretrain

    cfg = reward_config(load_config(None, overrides))
    result = pretrain(cfg, keep_mesh=True, make_task=reward_task)
    params = gather_full_state_dict(result.chunks, result.mesh)
    if result.mesh.is_logging_rank:
        torch.save({"records": result.records, "params": params}, out_path)
    result.mesh.barrier()
    result.mesh.destroy()


def _run(overrides, nproc, tmp_path, tag):
    out = str(tmp_path / f"{tag}.pt")
    mp.spawn(_worker, args=(nproc, free_port(), overrides, out), nprocs=nproc, join=True)
    return torch.load(out, weights_only=False)


KEYS = ("loss", "accuracy", "reward_chosen", "reward_rejected", "reward_margin", "grad_norm")


def test_pairwise_step_3d_sp_zero1_equals_one_process(pairs, tmp_path):
    d, tok, _ = pairs
    one = _run(_base(d, tok, "one"), 1, tmp_path, "one")
    many = _run(_base(d, tok, "many") + ["parallel.tp=2", "parallel.pp=2", "parallel.sp=true", "parallel.zero=1"],
                8, tmp_path, "many")
    for a, b in zip(one["records"], many["records"]):
        for k in KEYS + (("eval_loss", "eval_accuracy") if "eval_loss" in a else ()):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), k
    assert one["params"].keys() == many["params"].keys() and "score.weight" in one["params"]
    for name, value in one["params"].items():
        torch.testing.assert_close(many["params"][name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_packed_pairs_dp_equals_one_process_and_resume_is_exact(pairs, tmp_path):
    """Packed rows (pairs per micro-batch vary): dp=2 equals one process; stopping at step 2 and resuming
    continues the same curve."""
    d, tok, _ = pairs
    packed = ["data.pack=true", "train.micro_batch=2", "train.global_batch=4", "train.steps=4",
              "train.eval_interval=0"]
    straight = _run(_base(d, tok, "straight") + packed, 1, tmp_path, "straight")
    dp = _run(_base(d, tok, "dp") + packed, 2, tmp_path, "dp")
    losses = [r["loss"] for r in straight["records"]]
    for a, b in zip(straight["records"], dp["records"]):
        for k in KEYS:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
    resume = _base(d, tok, "resumed") + packed
    resume = [o for o in resume if not o.startswith(("checkpoint.resume", "checkpoint.save_on_exit"))]
    _run(resume + ["train.steps=2", "checkpoint.save_on_exit=true"], 1, tmp_path, "first")
    second = _run(resume + ["checkpoint.resume=auto"], 1, tmp_path, "second")
    assert [r["step"] for r in second["records"]] == [3, 4]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in second["records"]]), torch.tensor(losses[2:]),
                               rtol=0, atol=0)
    for name, value in straight["params"].items():
        torch.testing.assert_close(second["params"][name], value, rtol=0, atol=0)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "chosen": "b"', "line 2 is not valid JSON"),
    ('{"prompt": "a", "chosen": "b"}', "line 2 has no 'rejected' field"),
    ('{"chosen": "b", "rejected": "c"}', "no \"prompt\""),
    ('{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}', "\"margin\" must be a finite number"),
    ('{"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]}',
     "must end with an assistant message"),
])
def test_bad_pairs_fail_with_file_and_line(pairs, tmp_path, capsys, line, message):
    d, tok, _ = pairs
    write_pairs(tmp_path / "bad.jsonl", pair_records(1), [line])
    rc = main(["preprocess", "--format", "pairs", "--input", str(tmp_path / "bad.jsonl"), "--tokenizer", str(tok),
               "--output-prefix", str(tmp_path / "bad"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "bad.jsonl" in err, err
    assert not list(tmp_path.glob("bad.*bin*"))  # nothing half written


def test_score_refuses_a_model_without_value_head(pairs, tmp_path, capsys):
    from megatron_jinpan.checkpoint.convert import write_weights_checkpoint
    from megatron_jinpan.checkpoint.format import model_shapes

    cfg = get_model_config("debug", vocab_size=VOCAB)
    model = init_weights(Llama(cfg), seed=0)
    state = dict(model.state_dict())
    write_weights_checkpoint(tmp_path / "lm", cfg, {k: (s, torch.float32) for k, s in model_shapes(cfg).items()},
                             lambda k: state[k], progress=False)
    d, tok, _ = pairs
    rc = main(["reward", "score", "--checkpoint", str(tmp_path / "lm"), "--input", str(d / "pairs.jsonl"),
               "--output", str(tmp_path / "s.jsonl"), "--tokenizer", str(tok)])
    assert rc == 2 and "has no value head" in capsys.readouterr().err
    assert not (tmp_path / "s.jsonl").exists()
