"""Training data API: determinism, DP slicing, blend schedule, resume, mock, eval sets, errors."""
import json
import warnings

import pytest
import torch

from megatron_jinpan.config import ConfigError, load_config
from megatron_jinpan.data import BlendSchedule, build_eval_data, build_train_data
from megatron_jinpan.data.demo import generate_domain
from megatron_jinpan.data.preprocess import preprocess
from megatron_jinpan.data.tokenizer import train_tokenizer

warnings.filterwarnings("ignore")
DOMAINS = ("zh-finance", "en-finance", "zh-general")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    texts = {k: generate_domain(k, 150, 3) for k in DOMAINS}
    (d / "all.txt").write_text("\n".join(t for v in texts.values() for t in v) + "\n", encoding="utf-8")
    train_tokenizer(d / "all.txt", 1000, d / "t.model")
    for k, docs in texts.items():
        (d / f"{k}.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs),
                                      encoding="utf-8")
        preprocess(str(d / f"{k}.jsonl"), str(d / "t.model"), str(d / f"{k}_text_document"), append_eod=True,
                   progress=False)
    return d


def make_cfg(d, *extra, tmp=None):
    blend = [{"path": str(d / f"{k}_text_document"), "weight": w, "name": k} for k, w in zip(DOMAINS, (3, 1, 1))]
    return load_config(None, [
        f"data.tokenizer={d / 't.model'}", "model.vocab_size=1024", f"data.blend={json.dumps(blend)}",
        f"data.cache_dir={tmp or d / 'cache'}", "train.global_batch=8", "train.micro_batch=2", "train.seq_len=32",
        "data.split=90,10,0", *extra])


def _cat(mbs, key="tokens"):
    return torch.cat([m[key] for m in mbs])


def test_shapes_and_dtypes(data):
    train = build_train_data(make_cfg(data))
    mbs = train.microbatches(0, 0, 1)
    assert len(mbs) == 4
    for m in mbs:
        assert set(m) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert m["tokens"].shape == (2, 32) and m["tokens"].dtype == torch.int64
        assert m["labels"].dtype == torch.int64 and m["position_ids"].dtype == torch.int64
        assert m["loss_mask"].dtype == torch.float32
        assert torch.equal(m["labels"][:, :-1], m["tokens"][:, 1:])  # labels are the next tokens
        assert torch.equal(m["position_ids"][0], torch.arange(32))
        assert int(m["tokens"].max()) < 1000


def test_deterministic_by_seed(data, tmp_path):
    a = _cat(build_train_data(make_cfg(data)).microbatches(3))
    b = _cat(build_train_data(make_cfg(data, tmp=tmp_path / "other_cache")).microbatches(3))  # rebuilt indices
    assert torch.equal(a, b)
    c = _cat(build_train_data(make_cfg(data, "train.seed=99")).microbatches(3))
    assert not torch.equal(a, c)


@pytest.mark.parametrize("pack", [False, True])
def test_dp_slices_union_equals_dp1(data, pack):
    train = build_train_data(make_cfg(data, f"data.pack={str(pack).lower()}"))
    for step in (0, 5):
        full = train.microbatches(step, 0, 1)
        for dp in (2, 4):
            parts = [m for r in range(dp) for m in train.microbatches(step, r, dp)]
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                assert torch.equal(_cat(full, key), _cat(parts, key))


def test_layout_errors(data):
    train = build_train_data(make_cfg(data))
    with pytest.raises(ConfigError, match="train.global_batch=8 must be divisible"):
        train.microbatches(0, 0, 3)
    with pytest.raises(ConfigError, match="train.global_batch"):
        build_train_data(make_cfg(data, "train.global_batch=7"))


def test_schedule_weights_by_step():
    s = BlendSchedule(["zh", "en", "zhf", "enf"], [1, 1, 1, 1],
                      [{"step": 0, "weights": [0.6, 0.3, 0.05, 0.05]}, {"step": 100, "weights": [0.5, 0.1, 0.3, 0.1]},
                       {"step": 200, "weights": {"zh": 1, "en": 1}}], global_batch=16)
    assert s.weights(0) == pytest.approx([0.6, 0.3, 0.05, 0.05])
    assert s.weights(50) == pytest.approx([0.55, 0.2, 0.175, 0.075])
    assert s.weights(100) == pytest.approx([0.5, 0.1, 0.3, 0.1])
    assert s.weights(150) == pytest.approx([0.5, 0.3, 0.15, 0.05])
    assert s.weights(10_000) == pytest.approx([0.5, 0.5, 0, 0])
    for t in range(300):
        assert sum(s.allocation(t)) == 16
    assert s.allocation(250)[2:] == [0, 0]  # weight 0 -> never sampled
    # cumulative counts track the integrated weights within one sample
    expect = [16 * sum(s.weights(t)[k] for t in range(300)) for k in range(4)]
    assert all(abs(c - e) <= 1 for c, e in zip(s.consumed(300), expect))
    # the blend's own weights hold before a schedule that starts later
    s2 = BlendSchedule(["a", "b"], [1, 3], [{"step": 10, "weights": [1, 1]}], global_batch=4)
    assert s2.weights(0) == pytest.approx([0.25, 0.75]) and s2.weights(5) == pytest.approx([0.375, 0.625])


@pytest.mark.parametrize("bad,msg", [
    ([{"step": 0, "weights": [1, 2]}], "must list 3 weights"),
    ([{"step": 5, "weights": [1, 1, 1]}, {"step": 5, "weights": [1, 1, 1]}], "must be larger"),
    ([{"step": 0, "weights": [-1, 1, 1]}], "non-negative"),
    ([{"step": 0, "weights": {"nope": 1}}], "unknown dataset"),
    ([{"weights": [1, 1, 1]}], "mapping"),
])
def test_schedule_errors(data, bad, msg):
    cfg = make_cfg(data, f"data.blend_schedule={json.dumps(bad)}")
    with pytest.raises(ConfigError, match=msg):
        build_train_data(cfg)


def test_schedule_changes_mix_in_real_data(data):
    sched = [{"step": 0, "weights": [1, 0, 0]}, {"step": 10, "weights": [0, 0, 1]}]
    train = build_train_data(make_cfg(data, f"data.blend_schedule={json.dumps(sched)}"))
    assert {k for k, _ in train.step_assignment(0)} == {0}
    assert {k for k, _ in train.step_assignment(10)} == {2}
    assert train.weights(5) == pytest.approx({"zh-finance": 0.5, "en-finance": 0.0, "zh-general": 0.5})


def test_resume_mid_schedule_identical(data):
    sched = json.dumps([{"step": 0, "weights": [0.7, 0.2, 0.1]}, {"step": 20, "weights": [0.2, 0.3, 0.5]}])
    cfg = make_cfg(data, f"data.blend_schedule={sched}", "data.pack=true")
    continuous = build_train_data(cfg)
    seen = {t: continuous.microbatches(t, 1, 2) for t in range(30)}
    resumed = build_train_data(make_cfg(data, f"data.blend_schedule={sched}", "data.pack=true"))
    for t in (13, 25, 29):  # a fresh process at step t sees exactly what the continuous run saw
        for a, b in zip(seen[t], resumed.microbatches(t, 1, 2)):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_epochs_wrap_with_new_order(data):
    train = build_train_data(make_cfg(data))
    src = train.sources[1]
    n = len(src)
    first, second = [src.sample(i).text for i in range(n)], [src.sample(n + i).text for i in range(n)]
    assert [tuple(x) for x in first] != [tuple(x) for x in second]  # the next epoch is reshuffled
    # both epochs cover (nearly) the same tokens: only the final partial sample is dropped
    from collections import Counter
    c1, c2 = Counter(t for x in first for t in x[:-1].tolist()), Counter(t for x in second for t in x[:-1].tolist())
    assert sum((c1 - c2).values()) <= 2 * 33 and sum((c2 - c1).values()) <= 2 * 33


def test_eval_sets(data):
    evals = build_eval_data(make_cfg(data))  # valid split of each blend entry
    assert set(evals) == set(DOMAINS)
    mbs = evals["zh-finance"].microbatches(0, 0, 1)
    assert len(mbs) == 4 and mbs[0]["tokens"].shape == (2, 32)
    valid = json.dumps([{"path": str(data / "en-finance_text_document"), "name": "enfin"}])
    evals = build_eval_data(make_cfg(data, f"data.valid={valid}"))
    assert list(evals) == ["enfin"]
    a = _cat(evals["enfin"].microbatches(1, 0, 1))
    b = torch.cat([_cat(evals["enfin"].microbatches(1, r, 2)) for r in range(2)])
    assert torch.equal(a, b)


def test_missing_files_and_empty_blend(data, tmp_path):
    bad = json.dumps([{"path": str(tmp_path / "nope_text_document"), "weight": 1}])
    cfg = make_cfg(data)
    cfg.data.blend = json.loads(bad)
    with pytest.raises(FileNotFoundError, match=r"data.blend\[0\].path.*jinpan preprocess"):
        build_train_data(cfg)
    cfg.data.blend = []
    with pytest.raises(ConfigError, match="data.blend is empty"):
        build_train_data(cfg)
    cfg = make_cfg(data, "train.seq_len=100000")
    with pytest.raises(ConfigError, match="train.seq_len"):
        build_train_data(cfg)


def test_mock_data():
    cfg = load_config(None, ["data.mock=true", "train.global_batch=8", "train.micro_batch=2", "train.seq_len=64",
                             "data.pack=true", "model.vocab_size=100"])
    train = build_train_data(cfg)
    a = train.microbatches(7, 0, 1)
    assert torch.equal(_cat(a), _cat(build_train_data(cfg).microbatches(7, 0, 1)))
    assert not torch.equal(_cat(a), _cat(train.microbatches(8, 0, 1)))
    assert int(_cat(a).max()) < 100 and int(_cat(a).min()) >= 0
    parts = [m for r in range(4) for m in train.microbatches(7, r, 4)]
    assert len(parts) == 4 and torch.equal(_cat(a), _cat(parts))
    m = a[0]
    cu = m["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 128 and 64 in cu.tolist()
    # positions restart at every boundary
    flat = m["position_ids"].reshape(-1)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert torch.equal(flat[s:e], torch.arange(e - s))
    assert "mock" in build_eval_data(cfg)
    assert not torch.equal(_cat(build_eval_data(cfg)["mock"].microbatches(0)), _cat(train.microbatches(0)))
