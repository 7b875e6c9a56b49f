"""KV-cache generation on the training layout (posttrain/generation.py).

    python -m pytest -q tests/test_generation.py

Ground truth: greedy decoding of the single-device model by re-running it on the
whole sequence per token (`generate_without_cache`). The KV-cache generator must
give the same tokens (and log-probs to fp32 noise) in one process and under
(tp, pp, dp) = (2,1,1), (1,2,1) (interleaved) and (2,2,2) with SP, every rank of
a replica returning the same result.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from megatron_jinpan.models import Llama, get_model_config, init_weights
from megatron_jinpan.models.kv_cache import KVCache
from megatron_jinpan.parallel.local import free_port, set_worker_env
from megatron_jinpan.posttrain.generation import generate_without_cache, left_pad, sample_next

MAX_NEW = 12


def _prompts(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 9, 1, 13, 3, 7, 2, 11][:n]
    return [torch.randint(8, 256, (k,), generator=g).tolist() for k in lengths]


def _model(seed=1234):
    cfg = get_model_config("debug")
    return init_weights(Llama(cfg), seed).eval()


def _eos() -> int:
    """A token the untrained model emits mid-way through prompt 0's greedy response, used as EOS so that
    some sequences stop early and others run to max_new_tokens."""
    free = generate_without_cache(_model(), _prompts()[:1], max_new_tokens=MAX_NEW, eos_id=None).responses[0]
    return free[MAX_NEW // 2]


def test_cache_forward_matches_full_forward_with_left_padding():
    model = _model()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    tokens, valid, positions = left_pad(prompts, 0, "cpu")
    cache = KVCache(2, 10)
    with torch.no_grad():
        cache.begin(valid)
        logits = model(tokens, position_ids=positions, kv_cache=cache)
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p]))
            torch.testing.assert_close(logits[i, -len(p):], alone[0], rtol=1e-5, atol=1e-5)
        nxt = torch.tensor([[20], [21]])
        cache.begin(torch.ones_like(nxt, dtype=torch.bool))
        step = model(nxt, position_ids=positions[:, -1:] + 1, kv_cache=cache)
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p + [20 + i]]))
            torch.testing.assert_close(step[i, -1], alone[0, -1], rtol=1e-5, atol=1e-5)
    assert cache.length == 7


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, greedy=False, temperature=1.0, top_k=2, top_p=1.0, generator=gen)[0])
             for _ in range(200)}
    assert draws == {3, 4}
    # top_p=0.5: token 4 alone has p=0.636 >= 0.5, so it is the only candidate.
    draws = {int(sample_next(logits, greedy=False, temperature=1.0, top_k=0, top_p=0.5, generator=gen)[0])
             for _ in range(50)}
    assert draws == {4}
    tok, lp = sample_next(logits, greedy=False, temperature=2.0, top_k=0, top_p=1.0, generator=gen)
    assert lp.item() == pytest.approx(torch.log_softmax(logits / 2.0, -1)[0, tok].item(), abs=1e-6)


def _worker(rank, world, port, tp, pp, overrides, out_dir):
    set_worker_env(rank, world, port)
    torch.set_num_threads(1)
    from megatron_jinpan.config import load_config
    from megatron_jinpan.parallel.mesh import ParallelMesh
    from megatron_jinpan.parallel.parallelize import build_model
    from megatron_jinpan.posttrain.generation import generate

    cfg = load_config(None, ["model.name=debug", "train.device=cpu", f"parallel.tp={tp}", f"parallel.pp={pp}",
                             *overrides])
    mesh = ParallelMesh.create(tp, pp, torch.device("cpu"))
    try:
        chunks = build_model(cfg, mesh)
        prompts = _prompts()
        mine = prompts[mesh.dp_rank::mesh.dp]
        out = generate(chunks, mesh, mine, max_new_tokens=MAX_NEW, eos_id=_eos())
        sampled = generate(chunks, mesh, mine, max_new_tokens=4, greedy=False, temperature=0.8, top_p=0.9,
                           top_k=50, seed=11)
        torch.save({"dp_rank": mesh.dp_rank, "dp": mesh.dp, "greedy": out, "sampled": sampled},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        mesh.barrier()
    finally:
        mesh.destroy()


def _run(tmp_path, tp, pp, dp, overrides=()):
    world = tp * pp * dp
    mp.spawn(_worker, args=(world, free_port(), tp, pp, list(overrides), str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def reference():
    return generate_without_cache(_model(), _prompts(), max_new_tokens=MAX_NEW, eos_id=_eos())


def _check(results, reference):
    for res in results:
        rows = list(range(len(reference.responses)))[res["dp_rank"]::res["dp"]]
        assert res["greedy"].responses == [reference.responses[r] for r in rows]
        assert res["greedy"].finished == [reference.finished[r] for r in rows]
        for got, want in zip(res["greedy"].logprobs, [reference.logprobs[r] for r in rows]):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-4)
    # Every rank of a replica returns the same (sampled) result.
    by_replica = {}
    for res in results:
        by_replica.setdefault(res["dp_rank"], []).append(res["sampled"])
    for outs in by_replica.values():
        assert all(o == outs[0] for o in outs)
        assert all(len(r) <= 4 for r in outs[0].responses)


def test_reference_stops_at_eos(reference):
    # EOS is chosen so that both stopping paths are exercised.
    assert reference.finished[0] and not all(reference.finished)
    for resp, done in zip(reference.responses, reference.finished):
        assert (resp[-1] == _eos()) == done
        assert len(resp) == MAX_NEW or done


def test_single_process_matches_no_cache(tmp_path, reference):
    _check(_run(tmp_path, 1, 1, 1), reference)


def test_tensor_parallel(tmp_path, reference):
    _check(_run(tmp_path, 2, 1, 1), reference)


def test_pipeline_interleaved(tmp_path, reference):
    _check(_run(tmp_path, 1, 2, 1, ["parallel.pp_schedule=interleaved", "parallel.virtual_stages=2"]), reference)


def test_3d_with_sequence_parallel(tmp_path, reference):
    _check(_run(tmp_path, 2, 2, 2, ["parallel.sp=true"]), reference)


def test_bad_prompts():
    from megatron_jinpan.posttrain.generation import check_prompts

    with pytest.raises(ValueError, match="max_seq_len"):
        check_prompts([[1] * 250], 256, 256, 10)
    with pytest.raises(ValueError, match="outside"):
        check_prompts([[1, 300]], 256, 256, 10)
    with pytest.raises(ValueError, match="empty"):
        check_prompts([[]], 256, 256, 10)


def _hf_checkpoint(path):
    """A random 2-layer HF Llama with a character tokenizer saved in the same directory."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz :?\n"):
        vocab[ch] = 3 + i
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(path)


def test_cli_input_jsonl_on_a_pipeline(tmp_path):
    import json

    from megatron_jinpan.cli import main

    _hf_checkpoint(tmp_path / "hf")
    lines = [{"prompt": "what is a bond"}, {"messages": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "old answer"}]},
             {"instruction": "add", "input": "one and two"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    common = ["generate", "--checkpoint", str(tmp_path / "hf"), "--input", str(tmp_path / "in.jsonl"),
              "--template", "plain", "--max-new-tokens", "6", "--greedy", "--device", "cpu"]
    assert main(common + ["--output", str(tmp_path / "one.jsonl")]) == 0
    assert main(common + ["--output", str(tmp_path / "two.jsonl"), "--nproc", "2", "--pp", "2"]) == 0
    one = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert one == two and len(one) == 3
    assert [r["prompt"] for r in one] == ["what is a bond", "hi", "add\n\none and two"]
    assert all(r["response_tokens"] <= 6 for r in one)
    # Bad requests: one clear error, exit code 2.
    assert main(common + ["--top-p", "0"]) == 2
    assert main(["generate", "--checkpoint", str(tmp_path / "hf"), "--prompt", "ab", "--max-new-tokens", "200",
                 "--device", "cpu"]) == 2
