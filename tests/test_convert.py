"""Conversion: HF <-> ours (safetensors/.bin, sharded, GQA, tied), Meta -> ours, load_model, generate."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from megatron_jinpan import load_model  # noqa: E402
from megatron_jinpan.checkpoint.convert import hf_to_meta_rotary, hf_to_mj, meta_to_mj, mj_to_hf  # noqa: E402
from megatron_jinpan.checkpoint.format import CheckpointError  # noqa: E402


def _hf_model(num_kv_heads=2, tie=False, seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=num_kv_heads, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=50000.0,
        tie_word_embeddings=tie, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _tokens():
    return torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))


def _hf_tensors(d):
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(str(d / f)))
    return out


@pytest.mark.parametrize("kv,tie", [(8, False), (2, True), (2, False)])
def test_hf_round_trip(tmp_path, kv, tie):
    hf = _hf_model(kv, tie)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # sharded safetensors with an index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    hf_to_mj(tmp_path / "hf", tmp_path / "ckpt", tp=2, pp=2, progress=False)
    ours = load_model(tmp_path / "ckpt")
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)

    mj_to_hf(tmp_path / "ckpt", tmp_path / "back", max_shard_size="60KB", progress=False)
    original, back = _hf_tensors(tmp_path / "hf"), _hf_tensors(tmp_path / "back")
    if tie:
        original.pop("lm_head.weight", None)
    assert set(back) == set(original)
    for k, v in original.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert back[k].numpy().tobytes() == v.numpy().tobytes(), k
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").float().eval()
    assert reloaded.config.tie_word_embeddings == tie
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, hf(tokens).logits, atol=1e-6, rtol=1e-6)


def test_hf_bin_shards_and_load_model_on_hf_dir(tmp_path):
    hf = _hf_model(2, False, seed=3)
    d = tmp_path / "hfbin"
    d.mkdir()
    hf.config.save_pretrained(d)
    state = hf.state_dict()
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: state[n].clone() for n in part}, d / fname)
        weight_map.update({n: fname for n in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tokens = _tokens()
    with torch.no_grad():
        expected = hf(tokens).logits
        torch.testing.assert_close(load_model(d)(tokens), expected, atol=1e-5, rtol=1e-5)
        hf_to_mj(d, tmp_path / "ckpt", progress=False)
        torch.testing.assert_close(load_model(tmp_path / "ckpt")(tokens), expected, atol=1e-5, rtol=1e-5)


def _write_meta(hf, d, shards=2):
    """Write `hf` in Meta's consolidated.*.pth layout: model-parallel shards, interleaved rotary q/k."""
    c = hf.config
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    meta = {"tok_embeddings.weight": (sd["model.embed_tokens.weight"], 1), "norm.weight": (sd["model.norm.weight"], None),
            "output.weight": (sd["lm_head.weight"], 0)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        meta.update({
            f"layers.{i}.attention.wq.weight": (hf_to_meta_rotary(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads), 0),
            f"layers.{i}.attention.wk.weight": (hf_to_meta_rotary(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads), 0),
            f"layers.{i}.attention.wv.weight": (sd[p + "self_attn.v_proj.weight"], 0),
            f"layers.{i}.attention.wo.weight": (sd[p + "self_attn.o_proj.weight"], 1),
            f"layers.{i}.feed_forward.w1.weight": (sd[p + "mlp.gate_proj.weight"], 0),
            f"layers.{i}.feed_forward.w3.weight": (sd[p + "mlp.up_proj.weight"], 0),
            f"layers.{i}.feed_forward.w2.weight": (sd[p + "mlp.down_proj.weight"], 1),
            f"layers.{i}.attention_norm.weight": (sd[p + "input_layernorm.weight"], None),
            f"layers.{i}.ffn_norm.weight": (sd[p + "post_attention_layernorm.weight"], None),
        })
    d.mkdir()
    for r in range(shards):
        part = {k: (v if dim is None else v.chunk(shards, dim=dim)[r]).clone() for k, (v, dim) in meta.items()}
        part["rope.freqs"] = torch.zeros(4)
        torch.save(part, d / f"consolidated.{r:02d}.pth")
    (d / "params.json").write_text(json.dumps({
        "dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads, "vocab_size": -1, "multiple_of": 32, "norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_parameters["rope_theta"]}))


@pytest.mark.parametrize("kv", [8, 2])
def test_meta_to_mj(tmp_path, kv):
    hf = _hf_model(kv, False, seed=5)
    _write_meta(hf, tmp_path / "meta", shards=2)
    meta_to_mj(tmp_path / "meta", tmp_path / "ckpt", progress=False)
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "ckpt")(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)


def test_cli_convert_and_errors(tmp_path, capsys):
    from megatron_jinpan.cli import main

    hf = _hf_model(2, True, seed=7)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", "hf-to-mj", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ck"),
                 "--no-progress"]) == 0
    # The output is never overwritten.
    assert main(["convert", "hf-to-mj", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ck"),
                 "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["convert", "hf-to-mj", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ck2"),
                 "--tp", "3", "--no-progress"]) == 2
    assert main(["convert", "mj-to-hf", "--input", str(tmp_path / "ck"), "--output", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    assert (tmp_path / "out" / "config.json").exists()
    # A truncated tensor file: refused, never partially loaded.
    distcp = sorted((tmp_path / "ck").glob("*.distcp"))[0]
    data = distcp.read_bytes()
    distcp.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "ck")
    assert main(["convert", "mj-to-hf", "--input", str(tmp_path / "ck"), "--output", str(tmp_path / "out2"),
                 "--no-progress"]) == 2
    assert not (tmp_path / "out2").exists()


def test_generate(tmp_path, capsys):
    from megatron_jinpan.checkpoint.generate import generate
    from megatron_jinpan.cli import main

    hf = _hf_model(2, False, seed=9)
    hf.save_pretrained(tmp_path / "hf")
    hf_to_mj(tmp_path / "hf", tmp_path / "ck", progress=False)
    model = load_model(tmp_path / "ck")
    prompt = [1, 5, 9, 11]
    ours = generate(model, prompt, max_new_tokens=6)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0].tolist()
    assert ours == ref
    sampled = generate(model, prompt, max_new_tokens=5, temperature=0.8, top_p=0.9, seed=0)
    assert len(sampled) == len(prompt) + 5 and all(0 <= t < 97 for t in sampled)
    # CLI: a byte-level tokenizer directory written next to the checkpoint.
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_tiny_tokenizer(), bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(tmp_path / "tok")
    assert main(["generate", "--checkpoint", str(tmp_path / "ck"), "--prompt", "ab", "--tokenizer",
                 str(tmp_path / "tok"), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("ab")


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz "):
        vocab[ch] = 3 + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return tok
