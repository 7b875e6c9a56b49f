"""Single-device LLaMA model code (no parallelism here)."""
from .config import LlamaConfig, get_model_config, model_names
from .llama import Llama, causal_lm_loss, init_parameter, init_weights
from .ops import KernelChoice

__all__ = ["LlamaConfig", "Llama", "get_model_config", "model_names", "KernelChoice",
           "causal_lm_loss", "init_parameter", "init_weights"]
