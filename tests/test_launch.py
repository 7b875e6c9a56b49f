"""Launchers: the CLI, `jinpan pretrain --nproc`, and launch/torchrun.sh as a 2-node job on localhost."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["model.name=debug", "data.mock=true", "train.steps=2", "train.global_batch=4", "train.micro_batch=1",
        "train.seq_len=16", "train.device=cpu", "log.progress=false", "log.tensorboard=false",
        "checkpoint.resume=never", "checkpoint.save_on_exit=false"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_help_lists_commands():
    for cmd in (["jinpan", "--help"], [sys.executable, "-m", "megatron_jinpan", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
        for name in ("pretrain", "preprocess", "tokenizer"):
            assert name in out


def test_bad_layout_fails_before_launch(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_jinpan", "pretrain", "--nproc", "3", *ARGS,
                           "parallel.tp=2", f"run_dir={tmp_path}"], capture_output=True, text=True, env=_env())
    assert proc.returncode == 2
    assert "world size 3 is not divisible" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_nproc_spawn_matches_single_process(tmp_path):
    for n in (1, 2):
        subprocess.run([sys.executable, "-m", "megatron_jinpan", "pretrain", "--nproc", str(n), *ARGS,
                        f"run_dir={tmp_path}/n{n}"], check=True, env=_env(), timeout=300)
    assert _losses(tmp_path / "n2") == pytest.approx(_losses(tmp_path / "n1"), rel=1e-5)


def test_torchrun_script_two_nodes_on_localhost(tmp_path):
    endpoint = f"127.0.0.1:{_port()}"
    procs = [subprocess.Popen(["bash", str(ROOT / "launch/torchrun.sh"), "--nnodes", "2", "--node-rank", str(rank),
                               "--nproc-per-node", "1", "--rdzv-endpoint", endpoint, "--", "pretrain", *ARGS,
                               f"run_dir={tmp_path}/two_nodes"], env=_env(), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    subprocess.run([sys.executable, "-m", "megatron_jinpan", "pretrain", *ARGS, f"run_dir={tmp_path}/one"],
                   check=True, env=_env(), timeout=300)
    assert _losses(tmp_path / "two_nodes") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
