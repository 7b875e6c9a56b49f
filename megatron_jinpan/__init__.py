"""megatron-jinpan: Megatron-style 3D-parallel trainer for LLaMA."""
__version__ = "0.1.0"


def load_model(path, dtype=None, device=None):
    """A single-device `Llama` from one of our checkpoints (any layout) or a Hugging Face directory."""
    from .checkpoint.load import load_model as _load_model

    return _load_model(path, dtype=dtype, device=device)


__all__ = ["load_model", "__version__"]

import warnings as _warnings

# megatron-core (used for its datasets only) warns that apex/TE are absent; we do not need them.
_warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
