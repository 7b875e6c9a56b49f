"""Megatron-style tensor and sequence parallelism, applied from outside the model.

`apply_tensor_parallel(chunk, mesh, pcfg)` swaps the linears and embedding of
a (meta) `Llama` chunk for their parallel versions and records
`chunk.param_specs` (how each local parameter is cut from the global one):

    q/k/v_proj, gate/up_proj -> ColumnParallelLinear   weight [out/tp, in]   tp_dim 0
    o_proj, down_proj        -> RowParallelLinear      weight [out, in/tp]   tp_dim 1
    embed_tokens             -> VocabParallelEmbedding weight [V'/tp, h]     tp_dim 0 (V' = padded vocab)
    lm_head                  -> ColumnParallelLinear   weight [V'/tp, h]     tp_dim 0, logits stay split
    score (value head)       -> replicated [1, h]; under SP SequenceParallelValueHead

Heads (and GQA kv-heads) are split in contiguous blocks: rank r owns q heads
[r*nh/tp, (r+1)*nh/tp) and kv heads [r*nkv/tp, (r+1)*nkv/tp), which are
exactly the kv heads those q heads use under HF's repeat_interleave grouping.

Sequence parallelism (`parallel.sp`): activations between the parallel
regions are split along the sequence, [b, s/tp, h]. The embedding
reduce-scatters (instead of all-reducing), column-parallel linears all-gather
the sequence of their input, row-parallel linears reduce-scatter their
output, norms run on the sequence shard (their weight grads are partial and
summed over TP by `finalize_model_grads`, `ParamSpec.sequence_parallel`),
and the LM head gathers the sequence, so logits are [b, s, V'/tp].

One input collective per block: q/k/v (and gate/up) read the same input, so
models/llama.py's `project` calls them together and `column_parallel_project`
gathers (SP) or copies (no SP) that input ONCE for all of them; the backward
sums their input gradients and reduces the sum once. Per layer and
micro-batch that is Megatron's traffic (which fuses QKV and gate/up into one
weight): without SP 2 all-reduces forward (o, down) and 2 backward (attention
and MLP inputs); with SP 2 all-gathers + 2 reduce-scatters forward and the
mirror backward (plus, with overlap, one re-gather of each block's input for
the weight gradients). The weights stay separate, so checkpoint, Hugging Face
and LoRA names stay the single-device ones (q_proj, k_proj, ..., up_proj).

`parallel.tp_comm_overlap`: the backward of those shared-input projections
(`_SharedInputColumnMatmul`) launches the input-gradient all-reduce
(reduce-scatter under SP) asynchronously and computes the weight gradients
while it runs.

`vocab_parallel_cross_entropy` computes per-token losses from the split
logits with three small all-reduces (max, sum of exp, target logit); the
full-vocab logits are never gathered.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import comm, mappings
from .specs import ParamSpec


# ---------------------------------------------------------------- column-parallel projections of one shared input
class _SharedInputColumnMatmul(torch.autograd.Function):
    """Several column-parallel projections of ONE input, with ONE input collective each way.

    forward:  total = gather_seq?(x);  out_i = total W_i^T  (+ s_i B_i A_i drop_i(total) for a LoRA branch)
    backward: re-gather x (SP) while the summed input gradient sum_i dout_i W_i (+ LoRA terms) is computed,
              then reduce it ONCE (reduce-scatter under SP, all-reduce without) while the weight gradients
              of every branch are computed.

    Under SP only the sequence shard x is saved (not the gathered input; SP's memory saving stays), once
    for all branches. `branches` holds one (scale, keep_prob) per branch; `tensors` four per branch:
    weight, lora_A, lora_B (None without an adapter) and the dropout keep-mask (None without dropout).
    """

    @staticmethod
    def forward(ctx, x, group, sequence_parallel, branches, *tensors):
        total = mappings.gather_dim(x, group, mappings.SEQ_DIM) if sequence_parallel else x
        outs, zs = [], []
        for i, (scale, keep_prob) in enumerate(branches):
            weight, lora_a, lora_b, keep_mask = tensors[4 * i:4 * i + 4]
            out = F.linear(total, weight)  # autocast (if on) applies here
            z = None
            if lora_a is not None:
                dropped = total if keep_mask is None else total * keep_mask / keep_prob
                z = F.linear(dropped, lora_a)
                out = out + F.linear(z, lora_b) * scale
            outs.append(out)
            zs.append(z)
        ctx.group, ctx.sequence_parallel, ctx.branches = group, sequence_parallel, branches
        ctx.save_for_backward(x if sequence_parallel else total, *tensors, *zs)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        x, *saved = ctx.saved_tensors
        group, sp, branches = ctx.group, ctx.sequence_parallel, ctx.branches
        n = len(branches)
        tensors, zs = saved[:4 * n], saved[4 * n:]
        needs = ctx.needs_input_grad
        dtype = grad_outs[0].dtype
        if sp:
            # Re-gather the input asynchronously while computing the input gradient.
            _, finish_gather = mappings.all_gather_dim(x, group, mappings.SEQ_DIM, async_op=True)
        grad_input, grad_zs = None, []
        for i, (scale, keep_prob) in enumerate(branches):
            weight, lora_a, lora_b, keep_mask = tensors[4 * i:4 * i + 4]
            g = grad_outs[i]
            grad_z = None if lora_a is None else g.matmul(lora_b.to(dtype)) * scale  # [.., r]
            grad_zs.append(grad_z)
            if not needs[0]:
                continue
            part = g.matmul(weight.to(dtype))
            if grad_z is not None:
                grad_dropped = grad_z.matmul(lora_a.to(dtype))
                part = part + (grad_dropped if keep_mask is None else grad_dropped * keep_mask / keep_prob)
            grad_input = part if grad_input is None else grad_input + part  # every branch, reduced once
        total = finish_gather() if sp else x
        finish_comm = None
        if grad_input is not None:
            if sp:
                # Reduce-scatter the input grad along the sequence while the weight grads are computed.
                _, finish_comm = mappings.reduce_scatter_dim(grad_input, group, mappings.SEQ_DIM, async_op=True)
            else:
                grad_input, handle = mappings.all_reduce(grad_input, group, async_op=True)
                finish_comm = (lambda: (handle.wait() if handle is not None else None, grad_input)[1])
        # Weight gradients (of the trainable tensors only) while the input gradient travels.
        flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
        t2 = flat(total).to(dtype)
        grads = []
        for i, (scale, keep_prob) in enumerate(branches):
            weight, lora_a, lora_b, keep_mask = tensors[4 * i:4 * i + 4]
            g2 = flat(grad_outs[i])
            need_w, need_a, need_b = needs[4 + 4 * i:7 + 4 * i]
            grad_w = g2.t().matmul(t2).to(weight.dtype) if need_w else None
            grad_a = grad_b = None
            if lora_a is not None:
                if need_b:
                    grad_b = (g2.t().matmul(flat(zs[i]).to(dtype)) * scale).to(lora_b.dtype)
                if need_a:
                    dropped = t2 if keep_mask is None else t2 * flat(keep_mask).to(dtype) / keep_prob
                    grad_a = flat(grad_zs[i]).t().matmul(dropped).to(lora_a.dtype)
            grads += [grad_w, grad_a, grad_b, None]
        if finish_comm is not None:
            grad_input = finish_comm().to(x.dtype).contiguous()
        return (grad_input, None, None, None, *grads)


def column_parallel_project(x: torch.Tensor, linears) -> tuple:
    """Run several column-parallel linears (ColumnParallelLinear, or LoRALinear over one) on the same x.

    The input is gathered (SP) or copied into the TP region ONCE for all of them, so its backward reduces
    their summed input gradient once: q/k/v cost one collective each way, gate/up another. With
    `parallel.tp_comm_overlap` (and grads on) `_SharedInputColumnMatmul` overlaps that reduction with
    the weight gradients; otherwise the autograd mappings do the same synchronously.
    """
    first = linears[0]
    group, sp = first.group, first.sequence_parallel
    if any(m.group is not group or m.sequence_parallel != sp for m in linears):
        raise ValueError("column-parallel linears that share an input must share the TP group and SP setting")
    if mappings._world(group) == 1:
        return tuple(m.forward_gathered(x) for m in linears)
    if first.comm_overlap and torch.is_grad_enabled():
        gathered_shape = (x.shape[0], x.shape[1] * (mappings._world(group) if sp else 1), *x.shape[2:])
        branches, tensors = [], []
        for m in linears:  # in order: LoRA dropout masks come from the RNG in the single-device order
            consts, four = m.column_branch(gathered_shape, x.device)
            branches.append(consts)
            tensors += four
        return _SharedInputColumnMatmul.apply(x, group, sp, tuple(branches), *tensors)
    if sp:
        x = mappings.gather_from_sequence_parallel_region(x, group)
    else:
        x = mappings.copy_to_tp_region(x, group)
    return tuple(m.forward_gathered(x) for m in linears)


class ColumnParallelLinear(nn.Module):
    """Linear with the output dim split across TP: weight [out/tp, in]; no bias (LLaMA has none).

    Input is replicated ([b, s, in]) or, under SP, sequence-split ([b, s/tp, in]);
    output is [b, s, out/tp] (never gathered). Linears that read the same input (q/k/v, gate/up) are
    called together through `project_shared_input` (models/llama.py's `project`), which gathers it once.
    """

    def __init__(self, in_features: int, out_features_local: int, group, sequence_parallel: bool = False,
                 comm_overlap: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features_local = in_features, out_features_local
        self.weight = nn.Parameter(torch.empty(out_features_local, in_features, device=device, dtype=dtype))
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.comm_overlap = comm_overlap

    project_shared_input = staticmethod(column_parallel_project)

    def forward(self, x):
        return column_parallel_project(x, (self,))[0]

    def forward_gathered(self, total):
        """The projection of the already gathered / copied input."""
        return F.linear(total, self.weight)

    def column_branch(self, gathered_shape, device):
        """((scale, keep_prob), (weight, lora_A, lora_B, keep_mask)) for `_SharedInputColumnMatmul`."""
        return (1.0, 1.0), (self.weight, None, None, None)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out_local={self.out_features_local}, sp={self.sequence_parallel}, "
                f"overlap={self.comm_overlap}")


class RowParallelLinear(nn.Module):
    """Linear with the input dim split across TP: weight [out, in/tp]; input is [b, s, in/tp].

    Output is summed over TP: all-reduce -> [b, s, out], or under SP reduce-scatter -> [b, s/tp, out].
    """

    def __init__(self, in_features_local: int, out_features: int, group, sequence_parallel: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features_local, self.out_features = in_features_local, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features_local, device=device, dtype=dtype))
        self.group = group
        self.sequence_parallel = sequence_parallel

    def forward(self, x):
        out = F.linear(x, self.weight)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(out, self.group)
        return mappings.reduce_from_tp_region(out, self.group)

    def extra_repr(self) -> str:
        return f"in_local={self.in_features_local}, out={self.out_features}, sp={self.sequence_parallel}"


class VocabParallelEmbedding(nn.Module):
    """Embedding with the (padded) vocab split across TP: rank r owns rows [r*V/tp, (r+1)*V/tp).

    Ids outside this rank's range give zeros; the partial embeddings are
    summed over TP (all-reduce -> [b, s, h], or reduce-scatter under SP -> [b, s/tp, h]).
    """

    def __init__(self, num_embeddings_local: int, embedding_dim: int, vocab_start: int, group,
                 sequence_parallel: bool = False, device=None, dtype=None):
        super().__init__()
        self.num_embeddings_local, self.embedding_dim = num_embeddings_local, embedding_dim
        self.vocab_start, self.vocab_end = vocab_start, vocab_start + num_embeddings_local
        self.weight = nn.Parameter(torch.empty(num_embeddings_local, embedding_dim, device=device, dtype=dtype))
        self.group = group
        self.sequence_parallel = sequence_parallel

    def forward(self, ids):
        if mappings._world(self.group) == 1:
            out = F.embedding(ids, self.weight)
        else:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local = (ids - self.vocab_start).masked_fill(outside, 0)
            out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(out, self.group)
        return mappings.reduce_from_tp_region(out, self.group)

    def extra_repr(self) -> str:
        return f"rows=[{self.vocab_start}, {self.vocab_end}), dim={self.embedding_dim}, sp={self.sequence_parallel}"


class SequenceParallelValueHead(nn.Module):
    """The value head (hidden -> 1, `model.head: value`) under sequence parallelism.

    The head is replicated over TP. It scores this rank's sequence shard and then gathers the
    per-token values [b, s/tp, 1] -> [b, s, 1] (not the hidden states: h times less traffic).
    Every TP rank computes the same loss from the gathered values, so the gradient reaching the
    gather is already the full one on each rank: backward keeps this rank's slice (no
    reduce-scatter, which would multiply it by tp). The weight's gradient covers only the local
    shard, so it is summed over TP like the norm weights (`ParamSpec.sequence_parallel`).
    """

    def __init__(self, hidden_size: int, group, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, hidden_size, device=device, dtype=dtype))
        self.group = group

    def forward(self, x):
        return mappings.gather_from_sequence_parallel_region(F.linear(x, self.weight), self.group,
                                                             grad_reduce_scatter=False)


# ---------------------------------------------------------------- applying TP/SP to a chunk
def apply_tensor_parallel(chunk, mesh, pcfg) -> None:
    """Swap the chunk's modules for tensor-parallel ones (on the meta device) and record param specs."""
    cfg = chunk.cfg
    tp = mesh.tp
    padded = cfg.padded_vocab_size(tp)
    h = cfg.hidden_size
    specs: dict[str, ParamSpec] = {}
    meta = torch.device("meta")

    if tp == 1:
        # Vocab padding only; the modules stay plain.
        if chunk.embed_tokens is not None:
            chunk.embed_tokens = nn.Embedding(padded, h, device=meta)
            specs["embed_tokens.weight"] = ParamSpec("embed_tokens.weight", (cfg.vocab_size, h),
                                                     pad_dim=0, padded_size=padded)
        if chunk.lm_head is not None:
            chunk.lm_head = nn.Linear(h, padded, bias=False, device=meta)
            if cfg.tie_embeddings and chunk.embed_tokens is not None:
                chunk.lm_head.weight = chunk.embed_tokens.weight
            else:
                specs["lm_head.weight"] = ParamSpec("lm_head.weight", (cfg.vocab_size, h),
                                                    pad_dim=0, padded_size=padded)
        chunk.param_specs = specs
        chunk.sequence_parallel = False
        return

    group = mesh.tp_group
    sp = bool(getattr(pcfg, "sp", False))
    overlap = bool(getattr(pcfg, "tp_comm_overlap", False))
    for what, total in (("model.num_heads", cfg.num_heads), ("model.num_kv_heads", cfg.num_kv_heads),
                        ("model.intermediate_size", cfg.intermediate_size), ("padded vocab", padded)):
        if total % tp:
            raise ValueError(f"{what}={total} is not divisible by parallel.tp={tp}")
    hd = cfg.head_dim
    q_out, kv_out, ffn = cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.intermediate_size

    def column(name, full_out):
        specs[name + ".weight"] = ParamSpec(name + ".weight", (full_out, h), tp_dim=0)
        return ColumnParallelLinear(h, full_out // tp, group, sp, overlap, device=meta)

    def row(name, full_in):
        specs[name + ".weight"] = ParamSpec(name + ".weight", (h, full_in), tp_dim=1)
        return RowParallelLinear(full_in // tp, h, group, sp, device=meta)

    for idx, layer in chunk.layers.items():
        p = f"layers.{idx}"
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = column(f"{p}.self_attn.q_proj", q_out)
        attn.k_proj = column(f"{p}.self_attn.k_proj", kv_out)
        attn.v_proj = column(f"{p}.self_attn.v_proj", kv_out)
        attn.o_proj = row(f"{p}.self_attn.o_proj", q_out)
        mlp.gate_proj = column(f"{p}.mlp.gate_proj", ffn)
        mlp.up_proj = column(f"{p}.mlp.up_proj", ffn)
        mlp.down_proj = row(f"{p}.mlp.down_proj", ffn)
        if sp:
            for norm in ("input_layernorm", "post_attention_layernorm"):
                name = f"{p}.{norm}.weight"
                specs[name] = ParamSpec(name, (h,), sequence_parallel=True)
    if sp and chunk.norm is not None:
        specs["norm.weight"] = ParamSpec("norm.weight", (h,), sequence_parallel=True)

    if getattr(chunk, "score", None) is not None and sp:
        chunk.score = SequenceParallelValueHead(h, group, device=meta)
        specs["score.weight"] = ParamSpec("score.weight", (1, h), sequence_parallel=True)
    # Without SP the value head stays a plain replicated nn.Linear on the replicated hidden states.

    local_vocab = padded // tp
    if chunk.embed_tokens is not None:
        chunk.embed_tokens = VocabParallelEmbedding(local_vocab, h, mesh.tp_rank * local_vocab, group, sp,
                                                    device=meta)
        specs["embed_tokens.weight"] = ParamSpec("embed_tokens.weight", (cfg.vocab_size, h), tp_dim=0,
                                                 pad_dim=0, padded_size=padded)
    if chunk.lm_head is not None:
        chunk.lm_head = ColumnParallelLinear(h, local_vocab, group, sp, overlap, device=meta)
        if cfg.tie_embeddings and chunk.embed_tokens is not None:
            chunk.lm_head.weight = chunk.embed_tokens.weight
        else:
            specs["lm_head.weight"] = ParamSpec("lm_head.weight", (cfg.vocab_size, h), tp_dim=0,
                                                pad_dim=0, padded_size=padded)
    chunk.param_specs = specs
    # Stage-boundary activations are [b, s/tp, h] under SP (read by the pipeline schedules).
    chunk.sequence_parallel = sp


# ---------------------------------------------------------------- vocab-parallel cross-entropy
class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Softmax cross-entropy over vocab-split logits ([b, s, V'/tp] per TP rank), fp32 math.

    The shifted logits are the only full-size temporary (exp and the softmax are taken in place in it), and
    backward turns that saved softmax into the gradient in place (as Megatron does), so the graph can be
    walked back once: a second backward (retain_graph=True) raises instead of returning a wrong gradient.
    """

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, vocab_size, group):
        x = logits.float()
        n_local = x.shape[-1]
        # Padded vocab columns (global index >= vocab_size) never win: left out of the max, -inf after the shift.
        valid_cols = min(max(vocab_size - vocab_start, 0), n_local)
        if valid_cols == 0:  # a rank holding padding only
            logits_max = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
        else:
            logits_max = (x if valid_cols == n_local else x[..., :valid_cols]).max(dim=-1).values
        _tp_all_reduce(logits_max, group, op=dist.ReduceOp.MAX)
        x = x - logits_max.unsqueeze(-1)  # a new tensor: logits stay untouched
        if valid_cols < n_local:
            x[..., valid_cols:] = float("-inf")
        # Target logit: only the rank owning the label's column contributes.
        outside = (labels < vocab_start) | (labels >= vocab_start + n_local)
        local = (labels - vocab_start).masked_fill(outside, 0)
        target = x.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        _tp_all_reduce(target, group)
        exp = x.exp_()
        sum_exp = exp.sum(dim=-1)
        _tp_all_reduce(sum_exp, group)
        loss = sum_exp.log() - target
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, outside)
        ctx.logits_dtype = logits.dtype
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.consumed:
            raise RuntimeError("vocab-parallel cross-entropy reuses its saved softmax as the gradient, so its "
                               "graph can be walked back once only; recompute the loss instead of retain_graph=True")
        ctx.consumed = True
        softmax, local, outside = ctx.saved_tensors
        grad = softmax  # d loss / d logits = softmax - onehot(target), built in place
        hit = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local.unsqueeze(-1), -hit.unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, mesh) -> torch.Tensor:
    """Per-token cross-entropy [b, s] from logits split on the vocab ([b, s, V'/tp] on each TP rank).

    Columns with global index >= vocab_size (padding) are ignored. The loss is
    identical on every TP rank; the gradient flows only to this rank's columns.
    """
    tp = mesh.tp if mesh is not None else 1
    group = mesh.tp_group if tp > 1 else None  # None: nothing to reduce (not "the world")
    vocab_start = mesh.tp_rank * logits.shape[-1] if tp > 1 else 0
    return _VocabParallelCrossEntropy.apply(logits, labels, vocab_start, vocab_size, group)


def _tp_all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> None:
    if group is not None:
        comm.all_reduce(tensor, group, op=op)
