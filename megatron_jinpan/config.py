"""Typed run configuration: YAML recipe + dotted `key=value` overrides.

    from megatron_jinpan.config import load_config
    cfg = load_config("configs/pretrain/demo.yaml", ["parallel.tp=2", "train.steps=50"])

Every section is a dataclass; unknown keys and values of the wrong type are
errors that name the key. `model.name` picks a registry shape and any other
`model.*` key overrides one of its fields.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .models.config import LlamaConfig, get_model_config


class ConfigError(ValueError):
    """A config problem, with the key and the fix in its message."""


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    sp: bool = False
    pp_schedule: Literal["1f1b", "gpipe", "interleaved"] = "1f1b"
    virtual_stages: int = 1
    # Layers per pipeline stage (length pp*virtual_stages), for uneven splits; None = even.
    pp_layers: list | None = None
    zero: int = 0
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = False
    bucket_mb: float = 25.0
    # Reduce only the token-embedding rows some DP rank's step touched (a union row mask, then those
    # rows); dense when more than half the rows are touched. Helps when tokens per step << vocab.
    sparse_embedding_grad: bool = False
    # dtype on the wire for the DP gradient reduction. Gradients accumulate in fp32 either way;
    # bf16 casts each bucket just before its all-reduce / reduce-scatter (half the bytes, the sum
    # over dp rounded to bf16) and back into the fp32 buffer when it lands.
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    # Overlap TP input-grad all-reduce with the weight-grad matmul (Megatron's async TP).
    tp_comm_overlap: bool = True


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch: int = 8
    micro_batch: int = 1
    seq_len: int = 128
    seed: int = 1234
    # lora: only the low-rank adapters of `lora.*` train (parallel/lora.py); the base stays frozen.
    trainable: Literal["all", "embeddings", "new_embeddings", "lora"] = "all"
    recompute: Literal["none", "selective", "full"] = "none"
    # blocks: torch.compile each transformer block (after TP/SP/PP/recompute; parallel/compile.py).
    compile: Literal["none", "blocks"] = "none"
    dtype: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"
    eval_interval: int = 0  # 0 = no periodic eval
    eval_iters: int = 4
    # Rows of the embedding/LM head below this index stay frozen with trainable=new_embeddings.
    new_embeddings_from: int = 0
    # Held-out JSONL of prompts with reference answers (chat formats; the last assistant turn is the
    # reference): at each eval, greedy answers -> eval_exact_match / eval_contains (posttrain/sft.py).
    eval_generate: str | None = None
    # Multiple-choice / classification tasks at each eval: [{name, exam: DIR | classify: JSONL | task: NAME, ...}]
    # -> eval_acc_<name> (megatron_jinpan/eval/during_training.py).
    eval_tasks: list = field(default_factory=list)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 10
    decay_steps: int | None = None  # None = train.steps
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class DataConfig:
    tokenizer: str | None = None
    # [{path: PREFIX, weight: W, name: NAME}]; path is a preprocessed .bin/.idx prefix.
    blend: list = field(default_factory=list)
    # [{step: N, weights: [w0, w1, ...]}]: blend weights, piecewise-linear in the step.
    blend_schedule: list = field(default_factory=list)
    # Held-out sets: [{path: PREFIX, name: NAME}] -> eval_loss_NAME.
    valid: list = field(default_factory=list)
    split: str = "98,2,0"
    pack: bool = False  # packed documents with per-document attention (cu_seqlens)
    mock: bool = False  # synthetic tokens (tests and benchmarks only)
    cache_dir: str | None = None
    # Training micro-batches of the next `prefetch` steps are prepared in the background (data/prefetch.py)
    # by `num_workers` threads (0 = one); prefetch 0 = read in the loop. Results are identical either way.
    num_workers: int = 0
    prefetch: int = 2


@dataclass
class CheckpointConfig:
    interval: int = 0  # 0 = save only at the end
    resume: str = "auto"  # auto | never | PATH
    keep: int | None = None
    load: str | None = None  # initial weights (ours or HF dir) when not resuming
    save_on_exit: bool = True


@dataclass
class LogConfig:
    interval: int = 1
    progress: bool = True
    tensorboard: bool = True
    # Straggler detector (training/straggler.py): every N steps gather each rank's phase times and
    # GPU telemetry (0 = off); console warning when a rank's busy time exceeds threshold x the median.
    straggler_interval: int = 0
    straggler_threshold: float = 1.1


@dataclass
class KernelsConfig:
    attention: Literal["auto", "eager", "sdpa", "triton", "flash_attn"] = "auto"
    norm: Literal["auto", "torch", "triton"] = "auto"
    rope: Literal["auto", "torch", "triton"] = "auto"
    swiglu: Literal["auto", "torch", "triton"] = "auto"


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class LoRAConfig:
    """Low-rank adapters (train.trainable=lora): W x + (alpha/rank) * B A dropout(x) on each target."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Projections that get an adapter: any of q, k, v, o (attention) and gate, up, down (MLP).
    targets: list = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"lora.rank={self.rank} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"lora.targets={self.targets!r}: list distinct names among {', '.join(LORA_TARGETS)}")


@dataclass
class RewardConfig:
    """Pairwise reward model (`jinpan reward`, posttrain/reward.py): loss -log sigmoid(r_c - r_r - margin)."""

    margin: float = 0.0          # added to every pair's margin
    use_data_margin: bool = True  # use each pair's own "margin" field (0 when absent)
    # After training, mean/std of the reward over the held-out sets' responses, stored in the final
    # checkpoint's meta.json (reward_normalization) so PPO can centre rewards.
    normalize: bool = True


@dataclass
class DPOConfig:
    """Direct Preference Optimization (`jinpan dpo`, posttrain/dpo.py)."""

    beta: float = 0.1
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0  # cDPO: the probability that a label is flipped (sigmoid loss only)
    # The frozen reference: a checkpoint / HF dir; None = checkpoint.load (the initial policy).
    reference: str | None = None
    # Compute the reference's log-probs once before training (stored under run_dir) and free it.
    precompute_reference: bool = False


@dataclass
class SFTConfig:
    """Supervised fine-tuning (`jinpan sft`, posttrain/sft.py); see docs/sft.md."""

    # Chat template the chat datasets were preprocessed with (checked) and eval prompts are built with:
    # plain | llama2 | a Jinja file / string.
    template: str = "plain"
    # Several conversations per train.seq_len row, each attending only to itself (cu_seqlens).
    packing: bool = True
    # A conversation longer than train.seq_len + 1 tokens: keep its first tokens, or leave it out.
    truncation: Literal["right", "drop"] = "right"
    # train.eval_generate: tokens generated per prompt, and how many prompts (0 = all).
    eval_max_new_tokens: int = 32
    eval_samples: int = 0


@dataclass
class PPOConfig:
    """PPO / GRPO (`jinpan ppo`, posttrain/ppo.py); defaults as the public trainers use them. docs/ppo.md."""

    prompts: str | None = None         # JSONL: {"prompt": str} or a conversation per line
    template: str | None = "plain"     # chat template for the prompts; None = raw text after BOS
    # Roles (checkpoints or HF dirs). actor: None = checkpoint.load; reference: None = the initial actor;
    # critic: None = reward_model, else the initial actor (+ a fresh value head).
    actor: str | None = None
    reference: str | None = None
    critic: str | None = None
    reward_model: str | None = None    # frozen pairwise reward model (model.head=value)
    reward_fn: str | None = None       # "module:function(prompts, responses) -> list[float]" (rule reward)
    reward_model_weight: float = 1.0
    reward_fn_weight: float = 1.0
    reward_normalize: bool = True      # centre/scale RM scores with the RM's recorded mean/std
    reward_clip: float = 0.0           # clip scores to [-c, c] (0 = off)
    missing_eos_penalty: float = 0.0   # subtracted from the score of responses without EOS
    rollout_batch: int = 8             # prompts per PPO step (global)
    n_samples: int = 1                 # responses per prompt (GRPO groups)
    mini_batch: int = 8                # sequences per optimizer step (global)
    epochs: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    advantage: Literal["gae", "grpo"] = "gae"
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k3"] = "k1"
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    entropy_coef: float = 0.0
    whiten_advantages: bool = True
    critic_lr: float | None = None     # None = optim.lr


@dataclass
class Config:
    model: LlamaConfig = field(default_factory=lambda: get_model_config("debug"))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    run_dir: str = "runs/default"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))


# ------------------------------------------------------------------ parsing
def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _check_type(key: str, value: Any, annotation) -> Any:
    """Return value coerced to the annotation, or raise naming the key."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"Literal": Literal})  # noqa: S307 - our own annotations
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if annotation is list or origin is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"{key} must be a list, got {value!r}")
    if annotation is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    return value


def _build_section(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}.{unknown[0]}; valid keys in {prefix}: {', '.join(sorted(names))}")
    kwargs = {name: _check_type(f"{prefix}.{name}", value, hints[name]) for name, value in values.items()}
    return cls(**kwargs)


def config_from_dict(tree: dict) -> Config:
    tree = dict(tree or {})
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(tree) - names)
    if unknown:
        raise ConfigError(f"unknown top-level key {unknown[0]!r}; valid: {', '.join(sorted(names))}")
    model_values = dict(tree.pop("model", {}) or {})
    name = model_values.pop("name", "debug")
    hints = typing.get_type_hints(LlamaConfig)
    model_fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    for key in model_values:
        if key not in model_fields:
            raise ConfigError(f"unknown key model.{key}; valid keys in model: {', '.join(sorted(model_fields))}")
    checked = {k: _check_type(f"model.{k}", v, hints[k]) for k, v in model_values.items()}
    try:
        model = get_model_config(str(name), **checked)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    kwargs: dict[str, Any] = {"model": model}
    for f in dataclasses.fields(Config):
        if f.name == "model" or f.name not in tree:
            continue
        if f.name == "run_dir":
            kwargs["run_dir"] = _check_type("run_dir", tree["run_dir"], str)
        else:
            kwargs[f.name] = _build_section(typing.get_type_hints(Config)[f.name], tree[f.name] or {}, f.name)
    return Config(**kwargs)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (or the defaults) and apply dotted overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass --config with a YAML under configs/")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    tree = _merge(tree, parse_overrides(overrides or []))
    return config_from_dict(tree)
