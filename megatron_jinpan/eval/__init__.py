"""Evaluation on the training engine: perplexity, lm-eval tasks (multiple choice, classification),
generation, judging, and reports.

    import megatron_jinpan.eval        # registers the lm-eval model "jinpan" (when lm-eval is installed)
    jinpan eval ppl|mcq|classify|generate|judge|compare --help

See docs/eval.md.
"""
from .engine import EvalError, EvalModel

try:  # lm-eval is the `eval` extra; everything but the lm-eval commands works without it
    from .lm import JinpanLM  # noqa: F401  (registers "jinpan")
except ImportError as _exc:  # pragma: no cover - depends on the environment
    if "lm_eval" not in str(_exc):
        raise

__all__ = ["EvalModel", "EvalError"]
