"""Vocabulary resize of a checkpoint for an extended tokenizer (jinpan convert resize)."""
import dataclasses

import pytest
import torch

from megatron_jinpan import load_model
from megatron_jinpan.checkpoint import format as fmt
from megatron_jinpan.checkpoint.convert import write_weights_checkpoint
from megatron_jinpan.checkpoint.format import CheckpointError
from megatron_jinpan.checkpoint.load import read_model_state
from megatron_jinpan.checkpoint.resize import new_rows, resize_vocab
from megatron_jinpan.config import ConfigError
from megatron_jinpan.data.tokenizer import extend_tokenizer, load_tokenizer, train_tokenizer
from megatron_jinpan.models import Llama, get_model_config, init_weights

ENGLISH = ["the market closed higher on strong bank earnings", "bond yields fell as inflation cooled",
           "the central bank kept interest rates unchanged", "profits rose twelve percent this quarter"]
CHINESE = ["银", "行", "股", "市", "利", "率", "债", "券"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    lines = ENGLISH * 20 + [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    (root / "en.txt").write_text("\n".join(lines))
    base = train_tokenizer(root / "en.txt", 400, root / "en.model")
    extend_tokenizer(base, CHINESE, root / "zh.model")
    return root / "en.model", root / "zh.model"


def _checkpoint(tmp_path, vocab, tie=False):
    cfg = get_model_config("debug", vocab_size=vocab, tie_embeddings=tie)
    model = init_weights(Llama(cfg), seed=3)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k in fmt.model_keys(cfg)}
    out = write_weights_checkpoint(tmp_path / f"base_tie{tie}", cfg, {k: (tuple(v.shape), v.dtype) for k, v in state.items()},
                                   lambda k: state[k], progress=False)
    return out, model


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("init", ["mean", "subtokens"])
def test_resize_keeps_old_rows_and_logits(tmp_path, tokenizers, tie, init):
    en, zh = tokenizers
    old_vocab, new_vocab = load_tokenizer(en).vocab_size, load_tokenizer(zh).vocab_size
    assert new_vocab == old_vocab + len(CHINESE)
    src, model = _checkpoint(tmp_path, old_vocab, tie)
    out = resize_vocab(src, tmp_path / f"resized_{init}", zh, base_tokenizer=en, init=init, progress=False)
    cfg, state = read_model_state(out)
    assert cfg.vocab_size == new_vocab and cfg.tie_embeddings == tie
    _, old_state = read_model_state(src)
    for name, tensor in old_state.items():
        if name in ("embed_tokens.weight", "lm_head.weight"):
            assert tensor.shape[0] == old_vocab and state[name].shape[0] == new_vocab
            assert torch.equal(state[name][:old_vocab], tensor)
            expected = new_rows(tensor, new_vocab, init, load_tokenizer(zh), load_tokenizer(en))
            assert torch.equal(state[name][old_vocab:], expected)
        else:
            assert torch.equal(state[name], tensor), name
    # Old-token inputs: the old logit columns are unchanged (new rows only add columns).
    tokens = torch.randint(0, old_vocab, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(tokens)[..., :old_vocab], model(tokens), rtol=0, atol=0)


def test_subtoken_init_uses_the_base_split(tokenizers):
    en, zh = tokenizers
    base, ext = load_tokenizer(en), load_tokenizer(zh)
    old = torch.randn(base.vocab_size, 8)
    rows = new_rows(old, ext.vocab_size, "subtokens", ext, base)
    for i, ch in enumerate(CHINESE):
        ids = base.encode(ch)
        torch.testing.assert_close(rows[ext.encode(ch)[-1] - base.vocab_size], old[ids].mean(0))
        assert i < len(rows)
    torch.testing.assert_close(new_rows(old, ext.vocab_size, "mean")[0], old.mean(0))


def test_resize_errors(tmp_path, tokenizers):
    en, zh = tokenizers
    src, _ = _checkpoint(tmp_path, load_tokenizer(zh).vocab_size + 5)
    with pytest.raises(ConfigError, match="smaller than the checkpoint"):
        resize_vocab(src, tmp_path / "x", zh, progress=False)
    src, _ = _checkpoint(tmp_path / "b", load_tokenizer(en).vocab_size)
    with pytest.raises(ConfigError, match="needs --base-tokenizer"):
        resize_vocab(src, tmp_path / "y", zh, init="subtokens", progress=False)
    with pytest.raises(FileNotFoundError):
        resize_vocab(src, tmp_path / "z", tmp_path / "missing.model", progress=False)
    resize_vocab(src, tmp_path / "done", zh, progress=False)
    before = fmt.read_manifest(tmp_path / "done")
    with pytest.raises(CheckpointError, match="exists"):
        resize_vocab(src, tmp_path / "done", zh, progress=False)
    assert fmt.read_manifest(tmp_path / "done") == before
    assert dataclasses.asdict(fmt.model_config_from_meta(fmt.read_meta(tmp_path / "done")))["vocab_size"] == \
        load_tokenizer(zh).vocab_size
