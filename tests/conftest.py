import os

# Triton kernels run under the interpreter on CPU; must be set before triton is imported.
if os.environ.get("JINPAN_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# OpenBLAS with 2 threads on this 2-core box makes the interpreter's numpy matmuls ~1000x slower
# (tl.dot under TRITON_INTERPRET): pin it before numpy/torch load it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest
import torch

# Keep multi-process tests on 2 cores predictable.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():  # device-ok: test-only skip logic
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
