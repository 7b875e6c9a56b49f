"""LoRA (train.trainable=lora) under tensor, sequence, pipeline and data parallelism.

    python -m pytest -q tests/test_lora.py

Equivalence: the same LoRA run under (tp, pp, dp) = (2, 2, 2) with SP and ZeRO-1 gives the single
process's losses and adapters (fp32); the frozen base stays bit-identical to its initial value; B
starts at zero so step 0 is the base model; dropout masks are the same under TP as on one process;
a reward model's value head trains with the adapters.
Checkpoints: adapters only (+ optimizer), saved under (tp=2, SP, ZeRO-1) on our base checkpoint and
resumed under (pp=2, dp=2) on the same base converted to HF, continuing the single-process run;
`lora-merge` == unmerged (1e-5), and the PEFT export on transformers gives the same logits.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness import run_layout
from megatron_jinpan.config import LoRAConfig, load_config
from megatron_jinpan.models import Llama, get_model_config
from megatron_jinpan.models.llama import init_weights
from megatron_jinpan.parallel.lora import apply_lora, count_adapter_params, is_lora_name, merge_lora

def assert_same_training(reference: dict, other: dict) -> None:
    """Losses and gradient norms tight; adapters to 2e-5: A's gradient is exactly zero at step 0 (B = 0) and
    tiny after, where Adam's m / (sqrt(v) + eps) turns last-bit differences of the reduction order into
    ~1e-5 differences of an update. A missing or doubled TP/DP reduction changes the grad norm at once."""
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(other["losses"]), torch.tensor(reference["losses"]), **close)
    torch.testing.assert_close(torch.tensor(other["grad_norms"]), torch.tensor(reference["grad_norms"]), **close)
    assert reference["params"].keys() == other["params"].keys()
    for name, value in reference["params"].items():
        torch.testing.assert_close(other["params"][name], value, rtol=1e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


LORA = ["train.trainable=lora", "lora.rank=4", "lora.alpha=8", "optim.lr=1e-2", "optim.weight_decay=0.0"]


def _base_init(overrides=()):
    cfg = load_config(None, ["model.name=debug", *overrides])
    return {k: v.detach().clone() for k, v in init_weights(Llama(cfg.model), cfg.train.seed).state_dict().items()}


def test_apply_lora_keeps_step0_logits_and_counts_params():
    cfg = get_model_config("debug")
    model = init_weights(Llama(cfg), 7)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    before = model(tokens)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=["q", "v", "down"])
    apply_lora(model, lora, seed=7)
    assert torch.equal(model(tokens), before)  # B = 0
    adapters = {n: p for n, p in model.named_parameters() if is_lora_name(n)}
    assert sum(p.numel() for p in adapters.values()) == count_adapter_params(cfg, lora) > 0
    assert all(torch.count_nonzero(p) == 0 for n, p in adapters.items() if "lora_B" in n)
    assert all(torch.count_nonzero(p) > 0 for n, p in adapters.items() if "lora_A" in n)
    with pytest.raises(ValueError, match="already applied"):
        apply_lora(model, lora, seed=7)


def test_merge_equals_unmerged():
    cfg = get_model_config("debug")
    model = apply_lora(init_weights(Llama(cfg), 3), LoRAConfig(rank=4, alpha=8.0), seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(0.0, 0.02)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    unmerged = model(tokens)
    merged = merge_lora(model)(tokens)
    assert not any(is_lora_name(n) for n, _ in model.named_parameters())
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_layout(LORA, 1, tmp_path_factory.mktemp("lora_ref"))


def test_lora_3d_sp_zero1_matches_single_process(reference, tmp_path):
    out = run_layout(LORA + ["parallel.tp=2", "parallel.pp=2", "parallel.sp=true", "parallel.zero=1"], 8, tmp_path)
    assert_same_training(reference, out)
    base = _base_init()
    for run in (reference, out):
        adapters = {k: v for k, v in run["params"].items() if is_lora_name(k)}
        assert len(adapters) == 2 * 7 * get_model_config("debug").num_layers
        assert all(torch.count_nonzero(v) > 0 for v in adapters.values())  # B trained away from zero
        # The frozen base: bit-identical to its initial value after training.
        assert set(run["params"]) - set(adapters) == set(base)
        for name, value in base.items():
            assert torch.equal(run["params"][name], value), name


@pytest.fixture(scope="module")
def dropout_reference(tmp_path_factory):
    return run_layout(LORA + ["lora.dropout=0.2"], 1, tmp_path_factory.mktemp("lora_drop"))


def test_lora_dropout_masks_match_under_tp(reference, dropout_reference, tmp_path):
    """Column adapters with tp_comm_overlap (the overlapped autograd function; the reward test runs without)."""
    out = run_layout(LORA + ["lora.dropout=0.2", "parallel.tp=2", "parallel.sp=true"], 2, tmp_path)
    assert_same_training(dropout_reference, out)
    assert dropout_reference["losses"][1] != pytest.approx(reference["losses"][1], rel=1e-6)  # dropout did act


# ---------------------------------------------------------------- checkpoints, merge, PEFT
@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The seeded initial model (what the reference run trains on) as our checkpoint and as an HF dir."""
    from megatron_jinpan.checkpoint.convert import mj_to_hf, write_weights_checkpoint

    root = tmp_path_factory.mktemp("lora_base")
    cfg = load_config(None, ["model.name=debug"])
    state = _base_init()
    ours = write_weights_checkpoint(root / "base", cfg.model, {k: (tuple(v.shape), v.dtype) for k, v in state.items()},
                                    lambda k: state[k], progress=False)
    return {"ours": ours, "hf": mj_to_hf(ours, root / "base_hf", progress=False), "state": state}


@pytest.fixture(scope="module")
def lora_run(bases, tmp_path_factory):
    """Steps 1-2 under (tp=2, SP, ZeRO-1) on our base checkpoint; step 3 resumed under (pp=2, dp=2) on the HF base."""
    run_dir = tmp_path_factory.mktemp("lora_ckpt") / "run"
    first = run_layout(LORA + [f"checkpoint.load={bases['ours']}", "checkpoint.interval=2", f"run_dir={run_dir}",
                               "parallel.tp=2", "parallel.sp=true", "parallel.zero=1"], 2, run_dir.parent)
    step2 = run_dir / "checkpoints" / "step_0000002"
    resumed = run_layout(LORA + [f"checkpoint.resume={step2}", f"checkpoint.load={bases['hf']}", f"run_dir={run_dir}2",
                                 "checkpoint.save_on_exit=true",
                                 "parallel.pp=2", "parallel.zero=1"], 4, run_dir.parent)
    return {"first": first, "resumed": resumed, "step2": step2, "final": Path(f"{run_dir}2")}


def test_adapters_only_checkpoint_resumes_on_another_layout(reference, bases, lora_run):
    from megatron_jinpan.checkpoint import format as fmt

    first, resumed = lora_run["first"], lora_run["resumed"]
    torch.testing.assert_close(torch.tensor(first["losses"][:2]), torch.tensor(reference["losses"][:2]),
                               rtol=1e-5, atol=1e-6)
    assert len(resumed["losses"]) == 1  # only step 3 ran
    torch.testing.assert_close(resumed["losses"][0], reference["losses"][2], rtol=1e-5, atol=1e-6)
    for name, value in reference["params"].items():
        torch.testing.assert_close(resumed["params"][name], value, rtol=1e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")
    step2 = lora_run["step2"]
    meta = fmt.read_meta(step2)
    assert meta["adapters_only"] and meta["base"] == str(bases["ours"].resolve()) and meta["lora"]["rank"] == 4
    keys = fmt.tensor_metadata(step2)
    model_keys = {k[len("model."):] for k in keys if k.startswith("model.")}
    assert model_keys and all(is_lora_name(k) for k in model_keys)
    assert {k for k in keys if k.startswith("optim.")} == {f"optim.{n}.{s}" for n in model_keys
                                                         for s in ("exp_avg", "exp_avg_sq")}


def _unmerged_model(state, lora_ckpt):
    """Single-device LoRA model: the base + apply_lora + the checkpoint's adapters (not merged)."""
    from megatron_jinpan.checkpoint.lora import read_adapters

    _, _, model_cfg, lora_cfg, adapters = read_adapters(lora_ckpt)
    model = Llama(model_cfg)
    model.load_state_dict(state)
    apply_lora(model, lora_cfg, seed=0)
    missing = model.load_state_dict(adapters, strict=False).missing_keys
    assert not [k for k in missing if is_lora_name(k)]
    return model.eval()


def test_lora_merge_equals_unmerged(bases, lora_run, tmp_path, capsys):
    from megatron_jinpan import load_model
    from megatron_jinpan.checkpoint import format as fmt
    from megatron_jinpan.checkpoint.convert import mj_to_hf
    from megatron_jinpan.cli import main

    ckpt = lora_run["final"] / "checkpoints" / "step_0000003"
    assert fmt.read_meta(ckpt)["base"] == str(bases["hf"].resolve())  # resumed on the HF base: recorded
    unmerged = _unmerged_model(bases["state"], ckpt)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = unmerged(tokens)
        assert not torch.allclose(expected, Llama(unmerged.cfg).eval().requires_grad_(False)(tokens))
        assert main(["convert", "lora-merge", "--input", str(lora_run["final"]), "--output", str(tmp_path / "m"),
                     "--no-progress"]) == 0
        merged = load_model(tmp_path / "m")
        torch.testing.assert_close(merged(tokens), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_model(ckpt)(tokens), expected, rtol=1e-5, atol=1e-5)  # merged on load
        base_logits = load_model(bases["ours"])(tokens)
        assert (merged(tokens) - base_logits).abs().max() > 1e-4  # the adapters changed the model
    assert (mj_to_hf(tmp_path / "m", tmp_path / "m_hf", progress=False) / "config.json").is_file()
    # A base that is not there: one clear error naming it and the fix; nothing written.
    assert main(["convert", "lora-merge", "--input", str(ckpt), "--output", str(tmp_path / "m2"),
                 "--base", str(tmp_path / "moved")]) == 2
    err = capsys.readouterr().err
    assert "moved" in err and "does not exist; pass --base" in err and not (tmp_path / "m2").exists()


def test_peft_export_matches_transformers_peft(bases, lora_run, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from megatron_jinpan.cli import main

    ckpt = lora_run["final"] / "checkpoints" / "step_0000003"
    assert main(["convert", "mj-to-hf", "--lora", "--input", str(ckpt), "--output", str(tmp_path / "adapter")]) == 0
    hf = LlamaForCausalLM.from_pretrained(str(bases["hf"]), torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _unmerged_model(bases["state"], ckpt)(tokens)
        got = peft_model(input_ids=tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- memory estimator
def test_memory_estimate_counts_lora_states(monkeypatch):
    from megatron_jinpan.parallel.mesh import ParallelMesh
    from megatron_jinpan.parallel.optimizer import build_optimizer
    from megatron_jinpan.parallel.parallelize import build_model
    from megatron_jinpan.perf.memory import estimate_memory, lora_summary, measure_model_state_bytes

    for key in ("MASTER_ADDR", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    cfg = load_config(None, ["model.name=debug", "train.trainable=lora", "lora.rank=4", "lora.targets=[q,o,up]",
                             "train.device=cpu"])
    mesh = ParallelMesh.create(1, 1, torch.device("cpu"))
    try:
        chunks = build_model(cfg, mesh)
        optimizer = build_optimizer(chunks, cfg, mesh)
        measured = measure_model_state_bytes(chunks, optimizer)
        trainable = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    finally:
        mesh.destroy()
    est = estimate_memory(cfg, 1)
    assert est.params == pytest.approx(measured["params"], rel=1e-3)
    assert est.grads == pytest.approx(measured["grads"], rel=1e-3)
    assert est.optimizer == pytest.approx(measured["optimizer"], rel=1e-3)
    summary = lora_summary(cfg.model, cfg.lora)
    assert summary["trainable_params"] == trainable
    assert summary["optimizer_bytes"] == 8 * trainable < summary["full_ft_optimizer_bytes"]


# ---------------------------------------------------------------- reward model (value head) with LoRA
def _reward_worker(rank, world, port, overrides, out_path):
    from megatron_jinpan.parallel.local import set_worker_env

    set_worker_env(rank, world, port)
    torch.set_num_threads(1)
    from megatron_jinpan.parallel.parallelize import gather_full_state_dict
    from megatron_jinpan.posttrain.reward import reward_config, reward_task
    from megatron_jinpan.training.loop import pretrain

    result = pretrain(reward_config(load_config(None, overrides)), keep_mesh=True, make_task=reward_task)
    params = gather_full_state_dict(result.chunks, result.mesh)
    if result.mesh.is_logging_rank:
        torch.save({"losses": [r["loss"] for r in result.records], "grad_norms": [r["grad_norm"] for r in result.records],
                    "params": params}, out_path)
    result.mesh.barrier()
    result.mesh.destroy()


def test_reward_model_lora_tp_sp_equals_one_process(tmp_path):
    """The value head trains with the adapters (it starts untrained); the base stays frozen; TP+SP == one process
    (here without tp_comm_overlap, the dropout test runs with it)."""
    import torch.multiprocessing as mp

    from megatron_jinpan.parallel.local import free_port
    from megatron_jinpan.posttrain.pairs import preprocess_pairs
    from reward_fixtures import VOCAB, make_tokenizer, pair_records, write_pairs

    tok = make_tokenizer(tmp_path)
    write_pairs(tmp_path / "pairs.jsonl", pair_records(24))
    preprocess_pairs(str(tmp_path / "pairs.jsonl"), str(tok), str(tmp_path / "prefs"), max_seq_len=64, progress=False)
    base = ["model.name=debug", f"model.vocab_size={VOCAB}", f"data.tokenizer={tok}",
            f"data.blend=[{{path: {tmp_path}/prefs}}]", "data.split=100,0,0", "train.steps=2", "train.global_batch=4",
            "train.micro_batch=2", "train.seq_len=64", "train.device=cpu", "optim.lr=3e-3", "optim.warmup=1",
            "optim.eps=1e-3", "log.progress=false", "log.tensorboard=false", "checkpoint.resume=never",
            "checkpoint.save_on_exit=false", "reward.normalize=false", *LORA]
    runs = {}
    # tp_comm_overlap off: the column adapters take the synchronous autograd mappings.
    tp = ["parallel.tp=2", "parallel.sp=true", "parallel.zero=1", "parallel.tp_comm_overlap=false"]
    for tag, nproc, extra in (("one", 1, []), ("tp", 2, tp)):
        out = str(tmp_path / f"{tag}.pt")
        mp.spawn(_reward_worker, args=(nproc, free_port(), base + extra + [f"run_dir={tmp_path}/{tag}"], out),
                 nprocs=nproc, join=True)
        runs[tag] = torch.load(out, weights_only=False)
    assert_same_training(runs["one"], runs["tp"])
    initial = _base_init([f"model.vocab_size={VOCAB}", "model.head=value"])
    for run in runs.values():
        assert not torch.equal(run["params"]["score.weight"], initial["score.weight"])  # the head trained
        for name, value in initial.items():
            if name != "score.weight":
                assert torch.equal(run["params"][name], value), name
