"""kernels/ is installed as megatron_jinpan.kernels, in editable installs and in wheels."""
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_import_under_package_name():
    spec = importlib.util.find_spec("megatron_jinpan.kernels.rmsnorm")
    assert spec is not None and Path(spec.origin).name == "rmsnorm.py"
    top = importlib.util.find_spec("kernels")
    assert top is None or "megatron_jinpan" not in (top.origin or "")


def test_wheel_contains_kernels_under_package(tmp_path):
    pytest.importorskip("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("megatron_jinpan-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for op in ("rmsnorm", "rotary", "swiglu", "flash_attention"):
        assert f"megatron_jinpan/kernels/{op}.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)
