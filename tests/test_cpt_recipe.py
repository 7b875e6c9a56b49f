"""The two-stage continued-pretraining recipe end to end (launch/cpt_two_stage.sh), at a tiny size."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import torch

from megatron_jinpan.checkpoint.load import read_model_state
from megatron_jinpan.config import load_config
from megatron_jinpan.data import build_train_data

ROOT = Path(__file__).resolve().parents[1]
EMBEDDINGS = ("embed_tokens.weight", "lm_head.weight")


def _finance_share(weights: dict) -> float:
    return sum(w for name, w in weights.items() if "finance" in name)


def test_two_stage_recipe(tmp_path, monkeypatch):
    # The script works relative to its checkout: run a copy so data/ and runs/ land in tmp_path.
    for folder in ("launch", "configs"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(["bash", "launch/cpt_two_stage.sh", "train.steps=4", "train.eval_interval=4"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "runs" / "cpt_tiny"
    for stage in ("stage0", "stage1", "stage2"):
        lines = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines] == [1, 2, 3, 4]
        assert "eval_loss" in lines[-1]

    base_cfg, base = read_model_state(out / "stage0_resized")
    _, stage1 = read_model_state(out / "stage1")
    _, stage2 = read_model_state(out / "stage2")
    assert base_cfg.vocab_size == 3345
    for name, tensor in base.items():
        if name in EMBEDDINGS:
            assert not torch.equal(stage1[name], tensor), f"stage 1 must train {name}"
        else:
            assert torch.equal(stage1[name], tensor), f"stage 1 must leave {name} frozen"
        assert not torch.equal(stage2[name], stage1[name]), f"stage 2 must train {name}"

    # The finance share of the blend rises through stage 1 and on through stage 2.
    monkeypatch.chdir(tmp_path)
    s1 = build_train_data(load_config("configs/pretrain/tiny_stage1.yaml", [f"run_dir={tmp_path}/w1"]))
    s2 = build_train_data(load_config("configs/pretrain/tiny_stage2.yaml", [f"run_dir={tmp_path}/w2"]))
    shares = [_finance_share(s1.weights(0)), _finance_share(s1.weights(39)), _finance_share(s2.weights(39))]
    assert shares[0] < shares[1] < shares[2], shares
