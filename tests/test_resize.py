"""Vocabulary resize of a checkpoint for an extended tokenizer (jinpan convert resize)."""
import random

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
VOCAB = ("embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    lines = ENGLISH * 20 + [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    (root / "en.txt").write_text("\n".join(lines))
    train_tokenizer(root / "en.txt", 400, root / "en.model")
    extend_tokenizer(root / "en.model", CHINESE + ["▁银行"], root / "zh.model")
    return root / "en.model", root / "zh.model"


def _checkpoint(tmp_path, vocab, tie=False):
    cfg = get_model_config("debug", vocab_size=vocab, tie_embeddings=tie)
    model = init_weights(Llama(cfg), seed=3)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k in fmt.model_keys(cfg)}
    out = write_weights_checkpoint(tmp_path / f"base_tie{tie}", cfg, {k: (tuple(v.shape), v.dtype) for k, v in state.items()},
                                   lambda k: state[k], progress=False)
    return out, model.eval()


def _expected_subtoken_row(old, piece_text, base):
    """Mean of the old rows of the base tokenizer's split of the piece, '▁' only where the piece has it."""
    pieces = base._sp.encode(piece_text.lstrip("▁"), out_type=str)  # sentencepiece adds a dummy '▁' ...
    if not piece_text.startswith("▁"):
        assert pieces[0] == "▁"
        pieces = pieces[1:]  # ... which a word-internal piece does not have
    ids = [base._sp.piece_to_id(p) for p in pieces]
    assert ids and base._sp.unk_id() not in ids
    return old[ids].mean(0)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("init", ["mean", "subtokens"])
def test_resize_keeps_old_rows_and_logits(tmp_path, tokenizers, tie, init):
    en, zh = tokenizers
    old_vocab, new_vocab = load_tokenizer(en).vocab_size, load_tokenizer(zh).vocab_size
    assert new_vocab == old_vocab + len(CHINESE) + 1
    src, model = _checkpoint(tmp_path, old_vocab, tie)
    out = resize_vocab(src, tmp_path / f"resized_{init}", zh, base_tokenizer=en, init=init, progress=False)
    cfg, state = read_model_state(out)
    assert cfg.vocab_size == new_vocab and cfg.tie_embeddings == tie
    assert ("lm_head.weight" in state) == (not tie)
    assert fmt.read_meta(out)["source"]["old_vocab_size"] == old_vocab
    assert (out / "tokenizer" / "tokenizer.model").read_bytes() == zh.read_bytes()  # the new tokenizer travels along
    _, old_state = read_model_state(src)
    base, ext = load_tokenizer(en), load_tokenizer(zh)
    for name, tensor in old_state.items():
        if name in VOCAB:
            assert tensor.shape[0] == old_vocab and state[name].shape[0] == new_vocab
            assert torch.equal(state[name][:old_vocab], tensor)  # bit-identical
            added = state[name][old_vocab:]
            if init == "mean":
                assert torch.equal(added, tensor.mean(0).expand_as(added))
            else:
                for row, token_id in enumerate(range(old_vocab, new_vocab)):
                    expected = _expected_subtoken_row(tensor, ext._sp.id_to_piece(token_id), base)
                    torch.testing.assert_close(added[row], expected, rtol=0, atol=1e-7)
                assert not torch.allclose(added[0], added[1])  # different characters, different rows
        else:
            assert torch.equal(state[name], tensor), name
    # Old-token inputs: same hidden states, so the old logit columns are unchanged (new rows only add columns).
    tokens = torch.randint(0, old_vocab, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(tokens)[..., :old_vocab], model(tokens), rtol=0, atol=0)


def test_subtoken_init_splits_without_the_dummy_prefix(tokenizers):
    en, zh = tokenizers
    base, ext = load_tokenizer(en), load_tokenizer(zh)
    old = torch.randn(base.vocab_size, 8)
    rows = new_rows(old, ext.vocab_size, "subtokens", ext, base)
    for ch in CHINESE:
        token_id = ext._sp.piece_to_id(ch)
        byte_ids = [base._sp.piece_to_id(f"<0x{b:02X}>") for b in ch.encode("utf-8")]  # byte fallback split
        torch.testing.assert_close(rows[token_id - base.vocab_size], old[byte_ids].mean(0))
    # A word-initial piece keeps its '▁'.
    word = ext._sp.piece_to_id("▁银行")
    ids = [base._sp.piece_to_id("▁")] + [base._sp.piece_to_id(f"<0x{b:02X}>") for b in "银行".encode("utf-8")]
    torch.testing.assert_close(rows[word - base.vocab_size], old[ids].mean(0))
    # --vocab-size beyond the tokenizer: extra (padding) rows get the mean.
    padded = new_rows(old, ext.vocab_size + 3, "subtokens", ext, base)
    torch.testing.assert_close(padded[-3:], old.mean(0).expand(3, -1))
    torch.testing.assert_close(new_rows(old, ext.vocab_size, "mean")[0], old.mean(0))


@pytest.mark.parametrize("tie", [False, True])
def test_resize_hf_in_hf_out_loads_in_transformers(tmp_path, tokenizers, tie):
    transformers = pytest.importorskip("transformers")
    en, zh = tokenizers
    old_vocab, new_vocab = load_tokenizer(en).vocab_size, load_tokenizer(zh).vocab_size
    torch.manual_seed(0)
    hcfg = transformers.LlamaConfig(vocab_size=old_vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=tie, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hcfg).float().eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    out = resize_vocab(tmp_path / "hf", tmp_path / "hf_zh", zh, base_tokenizer=en, init="subtokens",
                       hf_output=True, max_shard_size="100KB", progress=False)
    assert len(list(out.glob("*.safetensors"))) > 1  # sharded, one shard in memory at a time
    assert (out / "tokenizer.model").read_bytes() == zh.read_bytes()
    resized = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    assert resized.config.vocab_size == new_vocab and resized.config.tie_word_embeddings == tie
    emb = resized.get_input_embeddings().weight
    assert torch.equal(emb[:old_vocab], hf.get_input_embeddings().weight)
    assert torch.equal(resized.lm_head.weight[:old_vocab], hf.lm_head.weight)
    tokens = torch.randint(0, old_vocab, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = hf(tokens, output_hidden_states=True), resized(tokens, output_hidden_states=True)
    for h0, h1 in zip(a.hidden_states, b.hidden_states):
        assert torch.equal(h0, h1)  # new rows change nothing upstream of the LM head
    torch.testing.assert_close(b.logits[..., :old_vocab], a.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.logits[..., old_vocab:], b.hidden_states[-1] @ resized.lm_head.weight[old_vocab:].T,
                               rtol=1e-5, atol=1e-5)
    # HF in, ours out: the same weights under our loader.
    ours = resize_vocab(tmp_path / "hf", tmp_path / "ours_zh", zh, base_tokenizer=en, init="subtokens", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(load_model(ours)(tokens), b.logits, rtol=1e-5, atol=1e-5)


def test_resize_errors_and_cli(tmp_path, tokenizers, capsys):
    from megatron_jinpan.cli import main

    en, zh = tokenizers
    src, _ = _checkpoint(tmp_path, load_tokenizer(zh).vocab_size + 5)
    with pytest.raises(ConfigError, match="smaller than the checkpoint"):
        resize_vocab(src, tmp_path / "x", zh, progress=False)
    src, _ = _checkpoint(tmp_path / "b", load_tokenizer(en).vocab_size)
    with pytest.raises(ConfigError, match="needs --base-tokenizer"):
        resize_vocab(src, tmp_path / "y", zh, init="subtokens", progress=False)
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        resize_vocab(src, tmp_path / "y", zh, vocab_size=load_tokenizer(en).vocab_size, progress=False)
    with pytest.raises(FileNotFoundError):
        resize_vocab(src, tmp_path / "z", tmp_path / "missing.model", progress=False)
    # A tokenizer that is not an extension of the checkpoint's (old ids would change meaning).
    (tmp_path / "other.txt").write_text("\n".join(" ".join(reversed(line.split())) for line in ENGLISH * 30))
    train_tokenizer(tmp_path / "other.txt", 420, tmp_path / "other.model")
    with pytest.raises(CheckpointError, match="does not extend"):
        resize_vocab(src, tmp_path / "z", tmp_path / "other.model", base_tokenizer=en, progress=False)
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z"))
    # CLI: writes once, then refuses to overwrite (exit 2, output untouched) unless --overwrite.
    args = ["convert", "resize", "--input", str(src), "--output", str(tmp_path / "done"), "--tokenizer", str(zh),
            "--base-tokenizer", str(en), "--init", "subtokens", "--vocab-size", str(load_tokenizer(zh).vocab_size + 7),
            "--no-progress"]
    assert main(args) == 0
    before = fmt.read_manifest(tmp_path / "done")
    assert fmt.model_config_from_meta(fmt.read_meta(tmp_path / "done")).vocab_size == load_tokenizer(zh).vocab_size + 7
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert fmt.read_manifest(tmp_path / "done") == before
    assert main(args + ["--overwrite", "--init", "mean"]) == 0
    assert fmt.read_meta(tmp_path / "done")["source"]["init"] == "mean"
