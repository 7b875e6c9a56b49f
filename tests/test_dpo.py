"""DPO: loss on a hand-made batch == the direct formula; (2,2,2)+SP+ZeRO-1 == one process; precomputed
reference == live reference; resume exact; LoRA reference = base with adapters off.

    python -m pytest -q tests/test_dpo.py
"""
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron_jinpan.parallel.local import free_port, set_worker_env
from megatron_jinpan.posttrain.dpo import preference_loss, sequence_logps
from megatron_jinpan.posttrain.pairs import collate_pairs, preprocess_pairs
from reward_fixtures import VOCAB, make_tokenizer, pair_records, write_pairs

SEQ = 96


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    tok = make_tokenizer(d)
    write_pairs(d / "pairs.jsonl", pair_records(40))
    preprocess_pairs(str(d / "pairs.jsonl"), str(tok), str(d / "prefs"), max_seq_len=SEQ, progress=False)
    return d, tok


def _base(d, tok, run):
    return ["model.name=debug", f"model.vocab_size={VOCAB}", f"data.tokenizer={tok}", f"data.blend=[{{path: {d}/prefs}}]",
            "data.split=80,20,0", "train.steps=2", "train.global_batch=4", "train.micro_batch=1", f"train.seq_len={SEQ}",
            "train.device=cpu", "train.eval_interval=2", "train.eval_iters=2", "optim.lr=3e-3", "optim.warmup=1",
            # Adam eps above the tiny gradients (prompt-only positions): layout-dependent fp32 noise in them
            # would otherwise become lr-sized sign flips.
            "optim.eps=1e-3",
            "log.progress=false", "log.tensorboard=false", "checkpoint.resume=never", "checkpoint.save_on_exit=false",
            f"run_dir={d}/{run}"]


# ---------------------------------------------------------------- the formula
def _toy_pairs():
    """Two pairs with hand-written ids and answer masks (prompt tokens 0, answer tokens incl. EOS 1)."""
    def side(prompt, answer):
        ids = np.array([1] + prompt + answer + [2], dtype=np.int64)
        mask = np.array([0] * (1 + len(prompt)) + [1] * (len(answer) + 1), dtype=np.float32)
        return ids, mask
    return [(side([5, 6, 7], [8, 9]), side([5, 6, 7], [10]), 0.0),
            (side([11, 12], [13, 14, 15]), side([11, 12], [16, 17]), 0.0)]


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("kind, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_loss_on_hand_made_batch_equals_formula(pack, kind, smoothing):
    items = _toy_pairs()
    mb = collate_pairs(items, 16, pack, rows=2 if pack else None)
    vocab, beta = 20, 0.1
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*mb["tokens"].shape, vocab, generator=g)
    ref_logits = torch.randn(*mb["tokens"].shape, vocab, generator=g)
    pi = sequence_logps(logits, mb, vocab, None)
    ref = sequence_logps(ref_logits, mb, vocab, None)
    loss, metrics = preference_loss(pi, ref, mb["pair_weight"], beta, kind, smoothing)

    # Direct: find each sequence in the rows by its ids and sum log_softmax at its answer tokens.
    flat_tokens = mb["tokens"].reshape(-1)
    lp, rlp = F.log_softmax(logits, -1).reshape(-1, vocab), F.log_softmax(ref_logits, -1).reshape(-1, vocab)
    want_pi, want_ref = [], []
    for k, (ids, mask) in enumerate(s for pair in items for s in pair[:2]):
        end = int(mb["score_index"][k])  # flat index of the last token (EOS)
        start = end - len(ids) + 1
        assert torch.equal(flat_tokens[start:end + 1], torch.as_tensor(ids))
        total_pi = total_ref = 0.0
        for t in range(1, len(ids)):  # token t is predicted at position t-1
            if mask[t]:
                total_pi += lp[start + t - 1, ids[t]].item()
                total_ref += rlp[start + t - 1, ids[t]].item()
        want_pi.append(total_pi)
        want_ref.append(total_ref)
    torch.testing.assert_close(pi, torch.tensor(want_pi), rtol=1e-5, atol=1e-5)
    want = 0.0
    for p in range(2):
        h = (want_pi[2 * p] - want_ref[2 * p]) - (want_pi[2 * p + 1] - want_ref[2 * p + 1])
        if kind == "ipo":
            want += (h - 1 / (2 * beta)) ** 2
        else:
            sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
            want += -(1 - smoothing) * math.log(sig(beta * h)) - smoothing * math.log(sig(-beta * h))
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert metrics["logp_chosen"].item() == pytest.approx(want_pi[0] + want_pi[2], rel=1e-5)


# ---------------------------------------------------------------- training runs
def _worker(rank, world, port, overrides, out_path):
    set_worker_env(rank, world, port)
    torch.set_num_threads(1)
    from megatron_jinpan.config import load_config
    from megatron_jinpan.parallel.parallelize import gather_full_state_dict
    from megatron_jinpan.posttrain.dpo import dpo_task
    from megatron_jinpan.training.loop import pretrain

    result = pretrain(load_config(None, overrides), keep_mesh=True, make_task=dpo_task)
    params = gather_full_state_dict(result.chunks, result.mesh)
    if result.mesh.is_logging_rank:
        torch.save({"records": result.records, "params": params}, out_path)
    result.mesh.barrier()
    result.mesh.destroy()


def _run(overrides, nproc, tmp_path, tag):
    out = str(tmp_path / f"{tag}.pt")
    mp.spawn(_worker, args=(nproc, free_port(), overrides, out), nprocs=nproc, join=True)
    return torch.load(out, weights_only=False)


KEYS = ("loss", "accuracy", "reward_chosen", "reward_rejected", "reward_margin", "logp_chosen", "logp_rejected",
        "grad_norm")


def _same(a, b, keys=KEYS, rel=1e-5, abs_=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for k in keys:
            if k not in x:  # eval keys exist on eval steps only
                assert k not in y
                continue
            assert y[k] == pytest.approx(x[k], rel=rel, abs=abs_), (x["step"], k)


def test_dpo_step_3d_sp_zero1_equals_one_process(pairs, tmp_path):
    d, tok = pairs
    one = _run(_base(d, tok, "one"), 1, tmp_path, "one")
    many = _run(_base(d, tok, "many") + ["parallel.tp=2", "parallel.pp=2", "parallel.sp=true", "parallel.zero=1"],
                8, tmp_path, "many")
    _same(one["records"], many["records"], KEYS + ("eval_loss", "eval_accuracy", "eval_logp_chosen"))
    assert one["records"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    assert one["records"][1]["reward_margin"] != 0.0
    for name, value in one["params"].items():
        torch.testing.assert_close(many["params"][name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_precomputed_reference_equals_live_and_resume_is_exact(pairs, tmp_path):
    d, tok = pairs
    four = ["train.steps=4", "train.eval_interval=0", "dpo.loss=sigmoid", "dpo.label_smoothing=0.1"]
    live = _run(_base(d, tok, "live") + four, 1, tmp_path, "live")
    pre = [o for o in _base(d, tok, "pre") + four if not o.startswith("checkpoint.")] + ["dpo.precompute_reference=true"]
    _run(pre + ["train.steps=2", "checkpoint.save_on_exit=true", "checkpoint.resume=never"], 1, tmp_path, "first")
    assert (d / "pre" / "reference_logps" / "train.npy").is_file()
    second = _run(pre + ["checkpoint.resume=auto"], 1, tmp_path, "second")  # resumes at step 2, reuses the table
    _same(live["records"][2:], second["records"], rel=1e-6, abs_=1e-6)
    for name, value in live["params"].items():
        torch.testing.assert_close(second["params"][name], value, rtol=1e-6, atol=1e-7)


def test_lora_reference_is_the_base_with_adapters_off(pairs, tmp_path):
    pytest.importorskip("megatron_jinpan.parallel.lora")
    d, tok = pairs
    out = _run(_base(d, tok, "lora") + ["train.trainable=lora", "lora.rank=4", "train.eval_interval=0",
                                        "optim.lr=1e-2"], 1, tmp_path, "lora")
    first, second = out["records"]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: the policy is its base at step 0
    assert second["reward_margin"] != 0.0 and second["loss"] != first["loss"]
