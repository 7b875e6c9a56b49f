"""Memory estimator (per rank, any layout and model) and tensor-level measurement.

    est = estimate_memory(cfg, world_size)            # MemoryEstimate, bytes per part, worst pipeline stage
    est.total_gb, est.as_dict()
    zero_optimizer_saving(model_cfg, dp=8)            # the recipe's "ZeRO saves ~87%"

Model states per trainable parameter on a rank (P = local params, TP/PP-sliced):

                                zero=0                zero=1
  weights                       w  (param dtype)      w
  gradient buffer (fp32)        4                     4 + 4/dp (reduce-scattered shard)
  optimizer states              m+v 8 (+ master 4     (master 4 + m 4 + v 4)/dp
                                 if weights not fp32)

`weights="fp32"` is this engine as written (fp32 weights, bf16 autocast
compute: the weights are the master copy, so zero=0 keeps only m and v);
`weights="bf16"` is classic mixed precision (bf16 weights + fp32 master in
the optimizer), where the optimizer states are 12 bytes/param and ZeRO-1 at
dp=8 keeps 12/8 of them: (12 - 1.5)/12 = 87.5% less optimizer memory.

Activations saved for backward, per layer and token (elements; a = act
bytes, 4 in fp32, ~2 under bf16 autocast), LLaMA block with SDPA/flash
attention (no s×s score matrix kept), t = tp:

  none       x, norm1 out, q, k, v (rotated), attn out, residual, norm2 out,
             gate, up, silu(gate), swiglu out:  ~ (5h + 2kv/t... see code)
  selective  the attention core's internals are recomputed (q, k, v stay
             as checkpoint inputs); with an eager backend this drops the
             s×s probabilities (a·s per token and head group)
  full       only each layer's input [b,s,h] (+ one layer's full set while
             it is recomputed in backward)

With SP the h-sized terms outside the column/row-parallel pairs are /t
too. Plus the embedding output, final norm, logits and log-softmax
(2·V/t per token) on the last stage. Activations count one micro-batch for
no pipeline; under 1F1B the first stage holds pp micro-batches in flight
(Megatron's rule), interleaved pp·(1 + (pp-1)/(pp·v)).
"""
from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass

import torch

from .comm_model import bucket_numels, chunk_param_numels, grad_wire_bytes


@dataclass
class MemoryEstimate:
    params: float
    grads: float
    optimizer: float
    activations: float
    pp_rank: int            # the stage the figures are for
    layout: str

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations

    @property
    def total_gb(self) -> float:
        return self.total / 2**30

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d

    def describe(self) -> str:
        gb = lambda x: f"{x / 2**30:8.3f} GiB"  # noqa: E731
        return (f"layout {self.layout} (pipeline stage {self.pp_rank})\n"
                f"  params       {gb(self.params)}\n  grads        {gb(self.grads)}\n"
                f"  optimizer    {gb(self.optimizer)}\n  activations  {gb(self.activations)}\n"
                f"  total        {gb(self.total)}")


def _act_bytes(dtype: str) -> float:
    return 2.0 if dtype == "bf16" else 4.0


def layer_activation_elems(m, b: int, s: int, tp: int = 1, sp: bool = False, recompute: str = "none",
                           attention: str = "sdpa") -> float:
    """Elements saved for backward by one decoder layer for one micro-batch [b, s]."""
    h, f, hd = m.hidden_size, m.intermediate_size, m.head_dim
    q, kv = m.num_heads * hd, m.num_kv_heads * hd
    # layer input, residual, and per RMSNorm its normalised fp32 tensor + scaled output
    outside = 6 * h / (tp if sp else 1)
    inside = (2 * q + 2 * kv + 4 * f) / tp      # q, k, v (rotated), attn out, gate, up, silu, swiglu out
    scores = 0.0
    if attention == "eager" and recompute == "none":
        scores = 2 * m.num_heads * s / tp      # scores + probabilities [b, a, s, s]
    per_token = outside + inside + scores
    if recompute == "full":
        return b * s * h / (tp if sp else 1)
    return b * s * per_token


def activation_bytes(cfg, world_size: int, pp_rank: int = 0, include_recompute: bool = True) -> float:
    """Peak bytes of saved activations on pipeline rank `pp_rank` during one step.

    With recompute=full the peak is max(forward: layer inputs + head, backward: layer inputs + the one
    layer being recomputed); include_recompute=False gives the forward part only (what saved-tensor
    hooks can observe: the non-reentrant checkpoint re-saves the recomputed tensors out of their sight).
    """
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp = p.tp, p.pp
    attention = cfg.kernels.attention if cfg.kernels.attention != "auto" else "sdpa"
    a = _act_bytes(t.dtype)
    b, s, h = t.micro_batch, t.seq_len, m.hidden_size
    chunks = chunk_param_numels(m, tp, pp, pp_rank, p.virtual_stages if pp > 1 else 1, p.pp_layers)
    layers = sum(sum(1 for n, _ in c if n.endswith("input_layernorm.weight")) for c in chunks)
    last = any(n == "norm.weight" for c in chunks for n, _ in c)
    per_layer = layer_activation_elems(m, b, s, tp, p.sp, t.recompute, attention)
    elems = layers * per_layer
    head = 0.0
    if last:  # final norm (input, normalised, output), logits + log-softmax
        vocab = m.padded_vocab_size(tp) / tp
        head = 3 * b * s * h / (tp if p.sp else 1) + 2 * b * s * vocab
    if t.recompute == "full" and layers and include_recompute:
        elems += max(head, layer_activation_elems(m, b, s, tp, p.sp, "none", attention))
    else:
        elems += head
    in_flight = 1.0
    if pp > 1:
        dp = world_size // (tp * pp)
        n_micro = t.global_batch // (t.micro_batch * dp)
        vs = p.virtual_stages if p.pp_schedule == "interleaved" else 1
        if p.pp_schedule == "gpipe":
            in_flight = n_micro
        else:
            in_flight = min(n_micro * vs, (pp - pp_rank) if vs == 1 else pp * (1 + (pp - 1) / (pp * vs)))
    return elems * a * in_flight


def estimate_memory(cfg, world_size: int, pp_rank: int | None = None, weights: str = "fp32") -> MemoryEstimate:
    """Per-rank memory of `cfg` on `world_size` ranks; pp_rank=None picks the stage with the largest total."""
    p = cfg.parallel
    tp, pp = p.tp, p.pp
    dp = world_size // (tp * pp)
    if pp_rank is None:
        ests = [estimate_memory(cfg, world_size, r, weights) for r in range(pp)]
        return max(ests, key=lambda e: e.total)
    w = 4 if weights == "fp32" else 2
    chunks = chunk_param_numels(cfg.model, tp, pp, pp_rank, p.virtual_stages if pp > 1 else 1, p.pp_layers)
    all_params = sum(k for c in chunks for _, k in c)
    train_chunks = chunk_param_numels(cfg.model, tp, pp, pp_rank, p.virtual_stages if pp > 1 else 1, p.pp_layers,
                                      cfg.train.trainable, getattr(cfg, "lora", None))
    if cfg.train.trainable == "lora":  # the adapters are model parameters too (all of them train)
        all_params += sum(k for c in train_chunks for _, k in c)
    tied_split = cfg.model.tie_embeddings and pp > 1
    buffer = sum(sum(bucket_numels(c, dp, p.bucket_mb, tied_split)) for c in train_chunks)  # padded, trainable
    params = all_params * w + (buffer - sum(k for c in train_chunks for _, k in c)) * w  # + padding of the buffer
    grads = buffer * 4.0
    if p.zero == 1:
        grads += buffer * 4.0 / dp
    if p.grad_reduce_dtype == "bf16" and dp > 1:  # the bf16 copy that goes on the wire (zero=1: and its shard)
        grads += buffer * grad_wire_bytes(p.grad_reduce_dtype) * (1 + (1 / dp if p.zero == 1 else 0))
    if p.zero == 1:
        real = sum(k for c in train_chunks for _, k in c)  # Adam m, v exist for real elements, master for padding too
        optimizer = buffer * 4.0 / dp + real * 8.0 / dp
    else:
        optimizer = buffer * (8.0 if weights == "fp32" else 12.0)
    acts = activation_bytes(cfg, world_size, pp_rank)
    layout = f"tp{tp} pp{pp} dp{dp} zero{p.zero} mb{cfg.train.micro_batch} {cfg.train.recompute}" + (" sp" if p.sp else "")
    return MemoryEstimate(params, grads, optimizer, acts, pp_rank, layout)


def lora_summary(model_cfg, lora_cfg, weights: str = "fp32") -> dict:
    """Trainable parameters and optimizer-state bytes of LoRA vs full fine-tuning (whole model, no sharding).

    Optimizer bytes per trainable parameter: Adam m + v (8), plus a 4-byte fp32 master copy when the
    weights are bf16; LoRA keeps them for the adapters only (the frozen base has none).
    """
    from ..parallel.lora import count_adapter_params

    per_param = 8.0 if weights == "fp32" else 12.0
    full, adapters = model_cfg.num_params(), count_adapter_params(model_cfg, lora_cfg)
    return {"model_params": full, "trainable_params": adapters, "trainable_fraction": adapters / full,
            "optimizer_bytes": adapters * per_param, "full_ft_optimizer_bytes": full * per_param,
            "grad_bytes": adapters * 4.0, "full_ft_grad_bytes": full * 4.0}


def zero_optimizer_saving(model_cfg, dp: int = 8) -> dict:
    """Optimizer-state memory per GPU without and with ZeRO-1 (mixed precision: fp32 master + Adam m, v)."""
    n = model_cfg.num_params()
    before = 12.0 * n
    after = 12.0 * n / dp
    return {"params": n, "dp": dp, "optimizer_gb_zero0": before / 2**30, "optimizer_gb_zero1": after / 2**30,
            "saving": 1 - after / before}


# ====================================================================== measurement (live tensors)
def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr(), t.device.type
    except Exception:  # pragma: no cover
        return id(t), "?"


def _storage_bytes(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().nbytes()
    except Exception:  # pragma: no cover
        return t.numel() * t.element_size()


def measure_model_state_bytes(chunks, optimizer) -> dict:
    """Bytes held by weights, gradient buffers and optimizer state, from the live objects (unique storages)."""
    seen: set = set()

    def add(t):
        if t is None or not isinstance(t, torch.Tensor):
            return 0
        key = _storage_key(t)
        if key in seen:
            return 0
        seen.add(key)
        return _storage_bytes(t)

    params = grads = opt = 0
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        params += add(getattr(chunk, "param_buffer", None))
        for prm in module.parameters():
            params += add(prm)
        grads += add(getattr(chunk, "grad_buffer", None))
        grads += add(getattr(chunk, "shard_grad", None))
        grads += add(getattr(chunk, "comm_buffer", None))
        grads += add(getattr(chunk, "comm_shard", None))
    for master in getattr(optimizer, "masters", []) or []:
        opt += add(master)
    inner = getattr(optimizer, "inner", None)
    if inner is not None:
        for state in inner.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.numel() > 1:
                    opt += add(v)
    return {"params": params, "grads": grads, "optimizer": opt}


class SavedTensorTracker:
    """Peak bytes of tensors saved for backward (unique storages), via autograd saved-tensor hooks.

        tracker = SavedTensorTracker()
        with tracker: loss = model(x).sum()       # forward(s)
        loss.backward()                           # frees them
        tracker.peak_bytes
    """

    def __init__(self, exclude=()):
        self.live: dict = {}     # storage key -> [refcount, bytes]
        self.current = 0
        self.peak_bytes = 0
        self.exclude = {_storage_key(t) for t in exclude}
        self._ctx = None

    def _release(self, key) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]

    def _pack(self, t: torch.Tensor):
        holder = _Holder(t)
        key = _storage_key(t)
        if key in self.exclude or isinstance(t, torch.nn.Parameter):
            return holder
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [0, _storage_bytes(t)]
            self.current += entry[1]
            self.peak_bytes = max(self.peak_bytes, self.current)
        entry[0] += 1
        weakref.finalize(holder, self._release, key)
        return holder

    @staticmethod
    def _unpack(holder):
        return holder.t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        return False


class _Holder:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def model_param_tensors(chunks) -> list:
    out = []
    for chunk in chunks:
        out += [getattr(chunk, "param_buffer", None), getattr(chunk, "grad_buffer", None)]
        out += list(getattr(chunk, "module", chunk).parameters())
    return [t for t in out if t is not None]
