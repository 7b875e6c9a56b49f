"""Training checkpoints: exact resume (plain and multi-process), resharding, corruption and mismatch errors,
atomic `latest`, keep, SIGTERM, checkpoint.load."""
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from harness import BASE  # noqa: E402

from megatron_jinpan.checkpoint import format as fmt  # noqa: E402
from megatron_jinpan.checkpoint.format import CheckpointError  # noqa: E402
from megatron_jinpan.checkpoint.manager import CheckpointManager  # noqa: E402
from megatron_jinpan.parallel.local import free_port, set_worker_env

COMMON = [o for o in BASE if not o.startswith(("train.steps", "checkpoint."))] + ["train.steps=4"]


def _losses(run_dir) -> list:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _install_stop(stop_after, only_rank0=True):
    """Deliver a real SIGTERM (to rank 0 only: the others learn it through the agreement all-reduce)."""
    original = CheckpointManager.maybe_save

    def maybe_save(self, state, chunks, optimizer):
        if stop_after is not None and state.step == stop_after and (self.mesh.rank == 0 or not only_rank0):
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, state, chunks, optimizer)

    CheckpointManager.maybe_save = maybe_save
    return original


def _train(overrides, stop_after=None):
    from megatron_jinpan.config import load_config
    from megatron_jinpan.training.loop import pretrain

    original = _install_stop(stop_after)
    try:
        return pretrain(load_config(None, COMMON + overrides))
    finally:
        CheckpointManager.maybe_save = original


# ------------------------------------------------------------------ single process
def test_resume_bitwise_plain_sigterm_and_keep(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _train([f"run_dir={a}", "checkpoint.resume=never", "checkpoint.save_on_exit=false"])
    reference = _losses(a)
    assert len(reference) == 4
    # Preempted (SIGTERM) after step 2 -> saves step 2 and stops even with save_on_exit=false.
    out = _train([f"run_dir={b}", "checkpoint.interval=3", "checkpoint.keep=1", "checkpoint.save_on_exit=false"],
                 stop_after=2)
    assert out.state.step == 2
    assert (b / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert len(_losses(b)) == 2
    _train([f"run_dir={b}", "checkpoint.interval=3", "checkpoint.keep=1"])  # resume=auto
    assert _losses(b) == reference  # bit-for-bit
    assert [p.name for p in fmt.list_step_dirs(b / "checkpoints")] == ["step_0000004"]  # step 2 and 3 pruned
    assert (b / "checkpoints" / "latest").read_text().strip() == "step_0000004"


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("saved") / "run"
    _train([f"run_dir={run}", "train.steps=1", "checkpoint.resume=never"])
    return run


def _copy_run(saved_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(saved_run, dst)
    return dst, dst / "checkpoints" / "step_0000001"


@pytest.mark.parametrize("damage,match", [("truncate", "truncated"), ("flip", "sha256"),
                                          ("manifest", "manifest.json is missing"), ("meta", "meta.json is missing")])
def test_corrupt_checkpoint_is_refused(saved_run, tmp_path, damage, match):
    run, step = _copy_run(saved_run, tmp_path)
    distcp = sorted(step.glob("*.distcp"))[0]
    if damage == "truncate":
        distcp.write_bytes(distcp.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(distcp.read_bytes())
        data[len(data) // 2] ^= 0xFF
        distcp.write_bytes(bytes(data))
    elif damage == "manifest":
        (step / "manifest.json").unlink()
    else:
        (step / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=match):
        _train([f"run_dir={run}", "train.steps=2"])


def test_mismatched_model_is_refused_and_nothing_overwritten(saved_run, tmp_path):
    run, step = _copy_run(saved_run, tmp_path)
    before = {p: p.read_bytes() for p in step.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"model.hidden_size: checkpoint 64 vs config 32.*model.num_layers"):
        _train([f"run_dir={run}", "train.steps=2", "model.hidden_size=32", "model.num_layers=2"])
    # A fresh run of another model into the same run_dir fails instead of overwriting.
    with pytest.raises(CheckpointError, match="different model"):
        _train([f"run_dir={run}", "train.steps=1", "model.hidden_size=32", "checkpoint.resume=never"])
    with pytest.raises(CheckpointError, match="weights only"):
        _train([f"run_dir={tmp_path / 'x'}", f"checkpoint.resume={_weights_ckpt(tmp_path)}"])
    assert {p: p.read_bytes() for p in step.rglob("*") if p.is_file()} == before


def _weights_ckpt(tmp_path):
    from megatron_jinpan.checkpoint.convert import write_weights_checkpoint
    from megatron_jinpan.models import get_model_config

    cfg = get_model_config("debug")
    shapes = fmt.model_shapes(cfg)
    out = tmp_path / "weights"
    write_weights_checkpoint(out, cfg, {k: (s, torch.float32) for k, s in shapes.items()},
                             lambda k: torch.zeros(shapes[k]), progress=False)
    return out


def test_failed_save_keeps_latest(saved_run, tmp_path, monkeypatch):
    run, _ = _copy_run(saved_run, tmp_path)
    real = fmt.write_manifest

    def failing(path, hashes=None):
        if "step_0000002" in str(path):
            raise OSError("disk full")
        return real(path, hashes)

    monkeypatch.setattr(fmt, "write_manifest", failing)
    with pytest.raises(OSError, match="disk full"):
        _train([f"run_dir={run}", "train.steps=2", "checkpoint.interval=1"])
    monkeypatch.setattr(fmt, "write_manifest", real)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    assert [p.name for p in fmt.list_step_dirs(run / "checkpoints")] == ["step_0000001"]
    out = _train([f"run_dir={run}", "train.steps=2"])  # resumes from the intact step 1
    assert out.state.step == 2 and (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"


def test_checkpoint_load_from_hf_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    from megatron_jinpan.config import load_config
    from megatron_jinpan.parallel.mesh import ParallelMesh
    from megatron_jinpan.parallel.optimizer import build_optimizer
    from megatron_jinpan.parallel.parallelize import build_model, gather_full_state_dict

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf")
    cfg = load_config(None, COMMON + [f"run_dir={tmp_path / 'r'}", f"checkpoint.load={tmp_path / 'hf'}",
                                      "parallel.zero=1"])
    mesh = ParallelMesh.create(1, 1, torch.device("cpu"))
    try:
        chunks = build_model(cfg, mesh)
        opt = build_optimizer(chunks, cfg, mesh)
        assert CheckpointManager(cfg, mesh).resume(chunks, opt) is None
        got = gather_full_state_dict(chunks, mesh)
        for k, v in hf.state_dict().items():
            assert torch.equal(got[k.removeprefix("model.")], v), k
    finally:
        mesh.destroy()


# ------------------------------------------------------------------ multi-process

def _worker(rank, world, port, jobs, out_dir):
    set_worker_env(rank, world, port)
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megatron_jinpan.config import load_config
    from megatron_jinpan.parallel.parallelize import gather_full_state_dict
    from megatron_jinpan.training.loop import pretrain

    for i, job in enumerate(jobs):
        original = _install_stop(job.get("stop_after"))
        try:
            result = pretrain(load_config(None, COMMON + job["overrides"]), keep_mesh=True)
        finally:
            CheckpointManager.maybe_save = original
        if job.get("params"):
            params = gather_full_state_dict(result.chunks, result.mesh)
            if result.mesh.rank == 0:
                torch.save(params, os.path.join(out_dir, f"params_{i}.pt"))
        result.mesh.barrier()
    dist.destroy_process_group()


def _spawn(jobs, nproc, out_dir):
    mp.spawn(_worker, args=(nproc, free_port(), jobs, str(out_dir)), nprocs=nproc, join=True)


def test_resume_multiprocess_exact_and_resharded(tmp_path):
    """(pp,dp)=(2,2) ZeRO-1, tied embeddings: 3 steps vs 1 + resume 2 bit-for-bit; resume under tp=2,pp=2 ~1e-5."""
    layout = ["train.steps=3", "parallel.pp=2", "parallel.zero=1", "model.tie_embeddings=true",
              "checkpoint.save_on_exit=false"]
    other = ["train.steps=3", "parallel.tp=2", "parallel.pp=2", "parallel.sp=true", "model.tie_embeddings=true"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    jobs = [
        {"overrides": layout + [f"run_dir={a}", "checkpoint.resume=never"]},
        {"overrides": layout + [f"run_dir={b}", "checkpoint.interval=2"], "stop_after": 1},
        {"overrides": layout + [f"run_dir={b}", "checkpoint.interval=2"]},
        {"overrides": other + [f"run_dir={c}", f"checkpoint.resume={b}/checkpoints/step_0000001"]},
    ]
    _spawn(jobs, 4, tmp_path)
    reference = _losses(a)
    assert len(reference) == 3
    assert _losses(b) == reference  # bit-for-bit across the interruption
    resharded = _losses(c)
    assert len(resharded) == 2
    torch.testing.assert_close(torch.tensor(resharded), torch.tensor(reference[1:]), rtol=1e-5, atol=1e-5)


def test_checkpoint_222_loads_under_111_and_121(tmp_path):
    from megatron_jinpan import load_model
    from megatron_jinpan.models import Llama

    run = tmp_path / "r222"
    _spawn([{"overrides": ["parallel.tp=2", "parallel.pp=2", "parallel.zero=1", f"run_dir={run}", "train.steps=1",
                           "checkpoint.resume=never", "checkpoint.save_on_exit=true"], "params": True}], 8, tmp_path)
    saved = torch.load(tmp_path / "params_0.pt", weights_only=True)
    ckpt = run / "checkpoints" / "step_0000001"
    meta = fmt.read_meta(ckpt)
    assert meta["layout"]["tp"] == 2 and meta["layout"]["pp"] == 2 and meta["layout"]["dp"] == 2

    # (1,1,1): the single-device model.
    model = load_model(run)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), saved[name]), name
    reference = Llama(model.cfg)
    reference.load_state_dict(saved)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference.eval()(tokens), rtol=0, atol=0)

    # (1,2,1): resume the full training state under pp=2 (no further steps) and gather it back.
    out = tmp_path / "o121"
    out.mkdir()
    _spawn([{"overrides": ["parallel.pp=2", "parallel.zero=0", f"run_dir={tmp_path / 'r121'}", "train.steps=1",
                           f"checkpoint.resume={ckpt}"], "params": True}], 2, out)
    loaded = torch.load(out / "params_0.pt", weights_only=True)
    assert loaded.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(loaded[name], value), name
