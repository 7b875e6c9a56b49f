"""LoRA: low-rank adapters on the attention/MLP projections, on any (tp, pp, dp) layout.

    jinpan sft --config configs/sft/tiny_lora.yaml            # train.trainable: lora + a lora: section
    apply_lora(model, cfg.lora, seed)                         # a single-device Llama (tests, merging)

Each target projection y = W x becomes

    y = W x + (alpha / rank) * B A dropout(x)        A [rank, in], B [out, rank]

with W frozen. Like the parallelize step, this is a transform applied from
outside the model: `build_model` calls `apply_lora` on each chunk after the
tensor-parallel swap and materialisation, so `models/` stays single-device.
The adapters follow the base layer's sharding, so TP adds no collective on
activations beyond the base layer's own:

    base                  A                         B                         forward
    ColumnParallelLinear  replicated [r, in]        split on out [out/tp, r]  W_t x + s B_t A x (x gathered once)
    RowParallelLinear     split on in [r, in/tp]    replicated [out, r]       sum_t (W_t x_t + s B A_t x_t):
                                                                              the base's one all-reduce /
                                                                              reduce-scatter sums both

Why no extra collective is needed (t = a TP rank):
- column: the input is all-gathered (SP) or copied (no SP) ONCE for both
  paths, and the LoRA path's input gradient is added to the base path's
  before the single reduce-scatter / all-reduce of the input gradient. With
  `parallel.tp_comm_overlap` (default) tensor.py's `_SharedInputColumnMatmul`
  does this by hand: it keeps only the sequence shard for backward (not the
  gathered input: SP's memory saving stays), re-gathers it asynchronously,
  and runs the input-gradient reduction while the adapter gradients are
  computed; without it the autograd mappings do the same synchronously.
  The sharing extends across a block: q/k/v (and gate/up), adapted or not,
  are projected from one gathered input (`column_parallel_project`);
- row: B (A_t x_t) summed over t equals B A x, so the LoRA output joins the
  base output before its all-reduce / reduce-scatter; the input gradient of a
  row-parallel layer needs no reduction.
The replicated factor (column A, row B) gets only this rank's part of its
gradient (column: B_t's output columns; row: A_t's input rows); it is marked
`ParamSpec.tp_partial_grad` and summed over TP once per step, together with
the sequence-parallel norm weights, in `finalize_model_grads`.

Initialisation is layout independent, like `parallelize.init_parameter`:
A is seeded by (train.seed, global name) — U(-1/sqrt(in), 1/sqrt(in)), PEFT's
default kaiming-uniform(a=sqrt(5)) — and B is zero, so step 0 is the base
model. Dropout masks are drawn at the full (unsharded) shape from the
default RNG (equal on every TP rank) and sliced, so a TP layout drops the
same elements as one process.

Global names match PEFT's: `layers.0.self_attn.q_proj.lora_A.weight`
(PEFT: `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import mappings
from .parallelize import ParamSpec
from .tensor import column_parallel_project

# lora.targets entry -> (sub-module of a decoder layer, projection)
TARGET_MODULES = {
    "q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"), "v": ("self_attn", "v_proj"),
    "o": ("self_attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}
ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def is_lora_name(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def lora_scale(lora_cfg) -> float:
    return float(lora_cfg.alpha) / int(lora_cfg.rank)


def init_lora_parameter(name: str, shape, seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The full, layout-independent initial value of adapter `name`: A uniform (PEFT's default), B zero."""
    if name.endswith(".lora_B.weight"):
        return torch.zeros(shape, device=device, dtype=dtype)
    generator = torch.Generator(device=device or "cpu")
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    bound = 1.0 / math.sqrt(shape[1])
    out = torch.empty(shape, device=device, dtype=torch.float32)
    out.uniform_(-bound, bound, generator=generator)
    return out.to(dtype)


class LoRALinear(nn.Module):
    """A (possibly tensor-parallel) bias-free linear with a low-rank adapter; the base `weight` keeps its name.

    kind "plain": nn.Linear semantics (one process or tp=1); "column" / "row": the Column/RowParallelLinear
    of parallel/tensor.py it replaces, with the adapters sharded as in the module docstring.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, kind: str,
                 group=None, tp_rank: int = 0, tp: int = 1, sequence_parallel: bool = False):
        super().__init__()
        self.weight = base.weight
        self.kind, self.group, self.tp_rank, self.tp = kind, group, tp_rank, tp
        self.sequence_parallel = sequence_parallel
        self.comm_overlap = bool(getattr(base, "comm_overlap", False))  # parallel.tp_comm_overlap
        self.rank, self.scale, self.dropout = rank, float(alpha) / rank, float(dropout)
        out_local, in_local = self.weight.shape
        # Global shapes of the base weight.
        self.out_features = out_local * tp if kind == "column" else out_local
        self.in_features = in_local * tp if kind == "row" else in_local
        b_out = out_local if kind == "column" else self.out_features  # B rows: split with a column base
        # skip_init: no default init, which would draw from the global RNG (dropout masks must not shift).
        kw = dict(bias=False, device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.utils.skip_init(nn.Linear, in_local, rank, **kw)
        self.lora_B = nn.utils.skip_init(nn.Linear, rank, b_out, **kw)

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout > 0 and self.training:
            x = x * self._dropout_mask(x)
        return self.lora_B(self.lora_A(x)) * self.scale

    def _dropout_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Inverted-dropout mask for x; under a row-parallel base, this rank's slice of the full-width mask."""
        return self._keep_mask(x.shape, x.device, x.dtype) / (1.0 - self.dropout)

    def _keep_mask(self, shape, device, dtype=torch.bool) -> torch.Tensor:
        """Which elements survive dropout, drawn at the full (unsharded) shape so every layout draws alike."""
        keep = 1.0 - self.dropout
        width = shape[-1]
        full_width = width * self.tp if (self.kind == "row" and self.tp > 1) else width
        full = torch.empty((*shape[:-1], full_width), device=device, dtype=torch.float32).bernoulli_(keep)
        return full.narrow(-1, self.tp_rank * width, width).to(dtype) if full_width != width else full.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "plain" or mappings._world(self.group) == 1:
            return F.linear(x, self.weight) + self._adapter(x)
        if self.kind == "column":
            # One gather/copy for both paths: its backward reduces their summed input gradient once.
            return column_parallel_project(x, (self,))[0]
        out = F.linear(x, self.weight) + self._adapter(x)  # row: both are partial sums over TP
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(out, self.group)
        return mappings.reduce_from_tp_region(out, self.group)

    def project_shared_input(self, x: torch.Tensor, linears) -> tuple:
        """models/llama.py's `project`: a column kind gathers x once for all of `linears` (tensor.py)."""
        if self.kind == "column":
            return column_parallel_project(x, linears)
        return tuple(linear(x) for linear in linears)

    def forward_gathered(self, total: torch.Tensor) -> torch.Tensor:
        """Column kind: base + adapter on the already gathered / copied input."""
        return F.linear(total, self.weight) + self._adapter(total)

    def column_branch(self, gathered_shape, device):
        """Column kind: ((scale, keep_prob), (W, A, B, keep-mask)) for tensor.py's shared-input matmul.
        The mask is drawn at the gathered (full-sequence) shape, like `_adapter` on the gathered input."""
        mask = self._keep_mask(gathered_shape, device) if self.dropout > 0 and self.training else None
        return (self.scale, 1.0 - self.dropout), (self.weight, self.lora_A.weight, self.lora_B.weight, mask)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """This rank's W + s B A (single device / tp=1 only: the shards of A and B do not multiply locally)."""
        if self.kind != "plain" and self.tp > 1:
            raise RuntimeError("merged_weight needs the full adapters; gather them first (gather_full_state_dict)")
        return self.weight + self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float()).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"scale={self.scale:g}, dropout={self.dropout:g}, sp={self.sequence_parallel}")


def _kind(module: nn.Module) -> str:
    from .tensor import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, LoRALinear):
        raise ValueError("LoRA is already applied to this model")
    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    if isinstance(module, nn.Linear):
        if module.bias is not None:
            raise ValueError("LoRA here wraps bias-free linears (LLaMA projections)")
        return "plain"
    raise TypeError(f"cannot put a LoRA adapter on {type(module).__name__}")


@torch.no_grad()
def apply_lora(chunk: nn.Module, lora_cfg, seed: int, mesh=None) -> nn.Module:
    """Wrap the `lora_cfg.targets` projections of every layer of `chunk` (a Llama or a pipeline/TP chunk).

    Call after the weights exist (after `materialize` in build_model, or on a loaded single-device model).
    Records each adapter's ParamSpec in `chunk.param_specs` and initialises it from its global name.
    """
    tp = mesh.tp if mesh is not None else 1
    tp_rank = mesh.tp_rank if mesh is not None else 0
    group = mesh.tp_group if (mesh is not None and tp > 1) else None
    if not hasattr(chunk, "param_specs"):
        chunk.param_specs = {}
    specs = chunk.param_specs
    rank = int(lora_cfg.rank)
    for idx, layer in chunk.layers.items():
        for target in lora_cfg.targets:
            parent_name, attr = TARGET_MODULES[target]
            parent = getattr(layer, parent_name)
            base = getattr(parent, attr)
            kind = _kind(base)
            sp = bool(getattr(base, "sequence_parallel", False))
            module = LoRALinear(base, rank, lora_cfg.alpha, lora_cfg.dropout, kind, group, tp_rank, tp, sp)
            setattr(parent, attr, module)
            name = f"layers.{idx}.{parent_name}.{attr}"
            a_name, b_name = name + ".lora_A.weight", name + ".lora_B.weight"
            split = tp > 1 and kind != "plain"
            if kind == "row":
                specs[a_name] = ParamSpec(a_name, (rank, module.in_features), tp_dim=1 if split else None)
                specs[b_name] = ParamSpec(b_name, (module.out_features, rank), tp_partial_grad=split)
            else:
                specs[a_name] = ParamSpec(a_name, (rank, module.in_features), tp_partial_grad=split)
                specs[b_name] = ParamSpec(b_name, (module.out_features, rank), tp_dim=0 if split else None)
            for local, gname in ((module.lora_A.weight, a_name), (module.lora_B.weight, b_name)):
                full = init_lora_parameter(gname, specs[gname].full_shape, seed, device=local.device)
                local.copy_(specs[gname].local_slice(full, tp_rank, tp).to(local.dtype))
    return chunk


def lora_modules(chunk: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in chunk.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter of a single-device model into its base weight and restore plain nn.Linear modules."""
    for name, module in list(lora_modules(model).items()):
        linear = nn.utils.skip_init(nn.Linear, module.in_features, module.out_features, bias=False,
                                    device=module.weight.device, dtype=module.weight.dtype)
        linear.weight.copy_(module.merged_weight())
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, linear)
    for key in [k for k in getattr(model, "param_specs", {}) if is_lora_name(k)]:
        del model.param_specs[key]
    return model


# ---------------------------------------------------------------- sizes (memory estimator, reports)
def adapter_shapes(model_cfg, lora_cfg, layers=None) -> dict[str, tuple]:
    """Global shapes of every adapter tensor of `layers` (default: all layers)."""
    h, f, hd = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.head_dim
    q, kv = model_cfg.num_heads * hd, model_cfg.num_kv_heads * hd
    in_out = {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, f), "up": (h, f), "down": (f, h)}
    r = int(lora_cfg.rank)
    out = {}
    for i in (range(model_cfg.num_layers) if layers is None else layers):
        for target in lora_cfg.targets:
            parent, attr = TARGET_MODULES[target]
            n_in, n_out = in_out[target]
            out[f"layers.{i}.{parent}.{attr}.lora_A.weight"] = (r, n_in)
            out[f"layers.{i}.{parent}.{attr}.lora_B.weight"] = (n_out, r)
    return out


def local_adapter_numels(model_cfg, lora_cfg, layers, tp: int = 1) -> list[tuple[str, int]]:
    """[(global name, numel on one TP rank)] of the adapters of `layers`, in registration order."""
    out = []
    for name, (rows, cols) in adapter_shapes(model_cfg, lora_cfg, layers).items():
        column = name.split(".")[-3] not in ("o_proj", "down_proj")
        split = (name.endswith("lora_B.weight") and column) or (name.endswith("lora_A.weight") and not column)
        out.append((name, rows * cols // (tp if split else 1)))
    return out


def count_adapter_params(model_cfg, lora_cfg) -> int:
    return sum(r * c for r, c in adapter_shapes(model_cfg, lora_cfg).values())


def in_adapter_checkpoint(name: str) -> bool:
    """Whether a parameter is stored in an adapters-only checkpoint: the adapters and a value head
    (a reward model's / critic's `score.weight`, trained along with them)."""
    return is_lora_name(name) or name == "score.weight"
