"""Reward model <-> Hugging Face LlamaForSequenceClassification: export parity, round trip, initialisation
from a language model.

    python -m pytest -q tests/test_reward_hf.py
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_jinpan.checkpoint.convert import hf_to_mj, mj_to_hf, write_weights_checkpoint
from megatron_jinpan.checkpoint.format import CheckpointError, model_shapes
from megatron_jinpan.checkpoint.load import load_model, read_model_state
from megatron_jinpan.models import Llama, get_model_config, init_parameter, init_weights


def _write(path, cfg, seed):
    model = init_weights(Llama(cfg), seed=seed)
    state = dict(model.state_dict())
    if "score.weight" in state:  # a trained-looking head, not the small init
        state["score.weight"] = torch.randn(1, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    write_weights_checkpoint(path, cfg, {k: (s, torch.float32) for k, s in model_shapes(cfg).items()},
                             lambda k: state[k], progress=False)
    return state


def _batch():
    """Right-padded (pad 0) rows ending in EOS (2), of different lengths (one of full width)."""
    g = torch.Generator().manual_seed(1)
    lengths = [19, 7, 12]
    tokens = torch.zeros(3, 19, dtype=torch.int64)
    for i, n in enumerate(lengths):
        tokens[i, :n - 1] = torch.randint(3, 256, (n - 1,), generator=g)
        tokens[i, n - 1] = 2
    return tokens, lengths


def test_export_matches_transformers_and_round_trips(tmp_path):
    cfg = get_model_config("debug", head="value")
    _write(tmp_path / "rm", cfg, seed=5)
    mj_to_hf(tmp_path / "rm", tmp_path / "hf", task="reward", progress=False)
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert hf_cfg["num_labels"] == 1 and hf_cfg["pad_token_id"] == 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert isinstance(hf, transformers.LlamaForSequenceClassification)

    tokens, lengths = _batch()
    ours = load_model(tmp_path / "rm")
    with torch.no_grad():
        expected = hf(tokens).logits[:, 0]
        values = ours(tokens)
    got = torch.stack([values[i, n - 1] for i, n in enumerate(lengths)])
    assert (got - expected).abs().max().item() < 1e-4
    assert expected.std() > 1e-3  # the rows do score differently

    # The scoring path PPO and `reward score` use, on a mesh, gives the same numbers.
    from megatron_jinpan.checkpoint.load import load_parallel_model
    from megatron_jinpan.parallel.mesh import ParallelMesh
    from megatron_jinpan.posttrain.reward import score_sequences

    mesh = ParallelMesh.create(1, 1, torch.device("cpu"))
    try:
        _, chunks = load_parallel_model(tmp_path / "hf", mesh)
        scores = score_sequences(chunks, mesh, [tokens[i, :n].tolist() for i, n in enumerate(lengths)], batch_size=2)
    finally:
        mesh.destroy()
    assert max(abs(a - b) for a, b in zip(scores, expected.tolist())) < 1e-4

    # HF -> ours keeps every tensor bit for bit.
    hf_to_mj(tmp_path / "hf", tmp_path / "back", task="reward", progress=False)
    c1, s1 = read_model_state(tmp_path / "rm")
    c2, s2 = read_model_state(tmp_path / "back")
    assert c2.head == "value" and s1.keys() == s2.keys() and "score.weight" in s1
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k


def test_task_must_match_the_model(tmp_path):
    _write(tmp_path / "lm", get_model_config("debug"), seed=1)
    _write(tmp_path / "rm", get_model_config("debug", head="value"), seed=1)
    with pytest.raises(CheckpointError, match="not what --task reward needs"):
        mj_to_hf(tmp_path / "lm", tmp_path / "x", task="reward", progress=False)
    with pytest.raises(CheckpointError, match="pass --task reward"):
        mj_to_hf(tmp_path / "rm", tmp_path / "y", task="causal-lm", progress=False)
    mj_to_hf(tmp_path / "lm", tmp_path / "lm_hf", progress=False)
    with pytest.raises(CheckpointError, match="checkpoint.load"):
        hf_to_mj(tmp_path / "lm_hf", tmp_path / "z", task="reward", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


@pytest.mark.parametrize("source", ["ours", "hf"])
def test_value_model_starts_from_a_language_model(tmp_path, source):
    """checkpoint.load of an LM: the backbone is the LM's, the LM head is dropped, score.weight keeps its
    seeded init (the same on every layout)."""
    from megatron_jinpan.checkpoint.manager import CheckpointManager
    from megatron_jinpan.config import load_config
    from megatron_jinpan.parallel.mesh import ParallelMesh
    from megatron_jinpan.parallel.parallelize import build_model, gather_full_state_dict

    lm = _write(tmp_path / "lm", get_model_config("debug"), seed=7)
    path = tmp_path / "lm"
    if source == "hf":
        mj_to_hf(tmp_path / "lm", tmp_path / "lm_hf", progress=False)
        path = tmp_path / "lm_hf"
    cfg = load_config(None, ["model.head=value", "train.device=cpu", f"run_dir={tmp_path}/run"])
    mesh = ParallelMesh.create(1, 1, torch.device("cpu"))
    try:
        chunks = build_model(cfg, mesh)
        CheckpointManager(cfg, mesh).load_weights(str(path), chunks, None)
        state = gather_full_state_dict(chunks, mesh)
    finally:
        mesh.destroy()
    assert "lm_head.weight" not in state
    for k, v in state.items():
        if k == "score.weight":
            assert torch.equal(v, init_parameter("score.weight", (1, 64), cfg.model, cfg.train.seed))
        else:
            assert torch.equal(v, lm[k]), k


def test_normalization_is_recorded_with_the_checkpoint_and_exported(tmp_path):
    from megatron_jinpan.checkpoint.format import verify_checkpoint
    from megatron_jinpan.posttrain.reward import add_checkpoint_meta, normalization_of

    _write(tmp_path / "rm", get_model_config("debug", head="value"), seed=2)
    stats = {"mean": 0.25, "std": 1.5, "count": 10, "sets": ["valid"]}
    add_checkpoint_meta(tmp_path / "rm", {"reward_normalization": stats})
    verify_checkpoint(tmp_path / "rm")  # manifest re-sealed: checksums still hold
    assert normalization_of(tmp_path / "rm") == stats
    mj_to_hf(tmp_path / "rm", tmp_path / "hf", task="reward", progress=False)
    assert normalization_of(tmp_path / "hf") == stats
