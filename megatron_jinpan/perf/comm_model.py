"""Communication model: α-β collective costs and the closed-form bytes of one training step.

Two halves:

1. **Costs** (used by the projection). A link moves S bytes in α + S/β.
   Ring collectives over n ranks:

       all_reduce       2(n-1)/n · S/β + 2(n-1)·α
       all_gather       (n-1)/n · S/β + (n-1)·α     (S = the gathered output)
       reduce_scatter   (n-1)/n · S/β + (n-1)·α     (S = the full input)
       p2p              S/β + α

   A group that spans nodes runs hierarchically (reduce-scatter inside the
   node over NVLink, the collective across nodes on S/k over InfiniBand,
   all-gather inside the node), see `collective_time`.

2. **Volumes**: `expected_comm_bytes(cfg, world_size, rank)` is the closed
   form of what `parallel/comm.py`'s accounting records for one optimizer
   step of `training.loop.run_step` on one rank, per (op, group) — the same
   convention as comm.py (input bytes for all-reduce/send/recv, the full
   output for all-gather, the full input for reduce-scatter; calls on a group
   of size 1 are not recorded):

   - DP, zero=0: all-reduce of the gradient buffer (every trainable
     local parameter, each bucket padded to a multiple of dp·64 elements;
     4 bytes an element, 2 with `parallel.grad_reduce_dtype=bf16`);
     zero=1: reduce-scatter of the same buffer + all-gather of the updated
     parameters (param dtype). Plus 8-byte scalars: the global token count,
     grad-norm partial sums over dp under zero=1, and on the last stage the
     step's metric sums (loss and token count, 16 bytes).
   - TP, per micro-batch and layer, with c = 2 shared column-parallel
     inputs (attention: q, k, v; MLP: gate, up — each block gathers its input
     once and reduces the summed input gradient once, parallel/tensor.py's
     `column_parallel_project`) and r = 2 row-parallel linears (o, down):
     all-reduces of [b,s,h], r forward + c backward; with SP: all-gathers
     (c forward, r + c backward, the latter re-gathering the block inputs for
     the weight grads) and reduce-scatters (r forward, c backward) of
     [b,s,h]. That is Megatron's traffic (it fuses QKV and gate/up into one
     weight each: also c = 2); before the shared input this engine had
     c = 5 (7 instead of 4 all-reduces per layer). The vocab-
     parallel embedding adds a forward all-reduce (SP: RS forward, AG
     backward), the column-parallel LM head a backward all-reduce (SP: AG
     forward, AG + RS backward), the vocab-parallel cross-entropy 3
     all-reduces of [b,s] fp32; SP norm weights add one all-reduce of their
     grads. Plus 8 bytes of grad-norm on the model group.
   - PP, per micro-batch and virtual chunk boundary: send/recv of the
     activation [b,s,h] forward and of its gradient backward ([b,s/t,h]
     with SP).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

_PAD_ELEMS = 64  # keep equal to parallel/data.py
# parallel/tensor.py projects q, k, v from one gathered input and gate, up from another (each block
# reduces its summed input gradient once), and o, down are row-parallel: 2 + 2 per layer, as Megatron.
COLUMN_INPUTS_PER_LAYER = 2
ROW_LINEARS_PER_LAYER = 2


# ====================================================================== α-β costs
@dataclass(frozen=True)
class Link:
    alpha: float  # latency per message, seconds
    beta: float   # bandwidth, bytes/s

    def p2p(self, nbytes: float) -> float:
        return self.alpha + nbytes / self.beta


def ring_allreduce_time(nbytes: float, n: int, link: Link) -> float:
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / link.beta + 2 * (n - 1) * link.alpha


def ring_allgather_time(nbytes_out: float, n: int, link: Link) -> float:
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes_out / link.beta + (n - 1) * link.alpha


def ring_reduce_scatter_time(nbytes_in: float, n: int, link: Link) -> float:
    return ring_allgather_time(nbytes_in, n, link)


def p2p_time(nbytes: float, link: Link) -> float:
    return link.p2p(nbytes)


def _flat(op: str, nbytes: float, n: int, link: Link, tree_latency: bool) -> float:
    if n <= 1:
        return 0.0
    if op == "all_reduce":
        t = ring_allreduce_time(nbytes, n, link)
        steps = 2 * (n - 1)
    else:
        t = ring_allgather_time(nbytes, n, link)
        steps = n - 1
    if tree_latency and n > 2:
        # NCCL switches to (double binary) trees when latency dominates: log2(n) hops instead of n-1.
        tree_steps = (2 if op == "all_reduce" else 1) * math.ceil(math.log2(n))
        t -= (steps - tree_steps) * link.alpha
    return t


@dataclass(frozen=True)
class Cluster:
    name: str
    gpus_per_node: int
    nvlink: Link            # per GPU, inside a node
    ib: Link                # per GPU across nodes (node IB bandwidth / GPUs per node)
    peak_tflops: float      # dense bf16 peak per GPU
    mem_gb: float           # usable device memory per GPU
    hbm_gbps: float = 2000.0  # device memory bandwidth (optimizer step, memory bound)
    tree_latency: bool = True

    def describe(self) -> str:
        return (f"{self.name}: {self.gpus_per_node} GPUs/node, NVLink {self.nvlink.beta / 1e9:.0f} GB/s "
                f"α={self.nvlink.alpha * 1e6:.0f} µs, IB {self.ib.beta / 1e9:.1f} GB/s per GPU "
                f"α={self.ib.alpha * 1e6:.0f} µs, {self.peak_tflops:.0f} TFLOP/s bf16, {self.mem_gb:.0f} GB")


def group_placement(n: int, stride: int, gpus_per_node: int) -> tuple[int, int]:
    """(members per node, nodes) of a group of n ranks `stride` apart (ranks fill nodes in order)."""
    if n <= 1:
        return 1, 1
    per_node = max(1, min(n, gpus_per_node // stride)) if stride < gpus_per_node else 1
    return per_node, -(-n // per_node)


def collective_time(op: str, nbytes: float, n: int, stride: int, cluster: Cluster) -> float:
    """Time of one collective over a group of n ranks `stride` apart (hierarchical across nodes).

    op: all_reduce | all_gather | reduce_scatter. nbytes: all-reduce input, all-gather output,
    reduce-scatter input (comm.py's convention).
    """
    if n <= 1 or nbytes <= 0:
        return 0.0
    k, nodes = group_placement(n, stride, cluster.gpus_per_node)
    tl = cluster.tree_latency
    if nodes == 1:
        return _flat(op, nbytes, n, cluster.nvlink, tl)
    if k == 1:
        return _flat(op, nbytes, n, cluster.ib, tl)
    if op == "all_reduce":
        return (_flat("reduce_scatter", nbytes, k, cluster.nvlink, tl)
                + _flat("all_reduce", nbytes / k, nodes, cluster.ib, tl)
                + _flat("all_gather", nbytes, k, cluster.nvlink, tl))
    # all_gather / reduce_scatter: one intra-node and one inter-node stage
    return _flat(op, nbytes, k, cluster.nvlink, tl) + _flat(op, nbytes / k, nodes, cluster.ib, tl)


def p2p_link(stride: int, cluster: Cluster) -> Link:
    """Link between pipeline neighbours `stride` ranks apart."""
    return cluster.nvlink if stride < cluster.gpus_per_node else cluster.ib


# ====================================================================== closed-form volumes
def chunk_param_numels(m, tp: int = 1, pp: int = 1, pp_rank: int = 0, virtual_stages: int = 1,
                       pp_layers=None, trainable: str = "all", lora=None) -> list[list[tuple[str, int]]]:
    """Per model chunk of this pipeline rank: [(global param name, LOCAL numel)] in registration order.

    trainable="lora" (with `lora`, a LoRAConfig) lists the chunk's adapters (parallel/lora.py)."""
    from ..parallel.pipeline import stage_layer_ranges

    h, f, hd = m.hidden_size, m.intermediate_size, m.head_dim
    q, kv = m.num_heads * hd, m.num_kv_heads * hd
    vocab = m.padded_vocab_size(tp)
    vs = virtual_stages if pp > 1 else 1
    stages = pp * vs
    ranges = stage_layer_ranges(m.num_layers, stages, pp_layers) if stages > 1 else [range(m.num_layers)]
    out = []
    for v in range(vs):
        g = v * pp + pp_rank
        first, last = g == 0, g == stages - 1
        params: list[tuple[str, int]] = []
        if first:
            params.append(("embed_tokens.weight", vocab * h // tp))
        for i in ranges[g]:
            p = f"layers.{i}."
            params += [(p + "input_layernorm.weight", h),
                       (p + "self_attn.q_proj.weight", h * q // tp), (p + "self_attn.k_proj.weight", h * kv // tp),
                       (p + "self_attn.v_proj.weight", h * kv // tp), (p + "self_attn.o_proj.weight", q * h // tp),
                       (p + "post_attention_layernorm.weight", h),
                       (p + "mlp.gate_proj.weight", h * f // tp), (p + "mlp.up_proj.weight", h * f // tp),
                       (p + "mlp.down_proj.weight", f * h // tp)]
        if last:
            params.append(("norm.weight", h))
            if not (m.tie_embeddings and first):
                params.append(("lm_head.weight", vocab * h // tp))
        if trainable == "lora":
            from ..parallel.lora import local_adapter_numels

            if lora is None:
                raise ValueError("chunk_param_numels(trainable='lora') needs the lora config")
            params = local_adapter_numels(m, lora, ranges[g], tp)
        elif trainable != "all":
            params = [(n, k) for n, k in params if n in ("embed_tokens.weight", "lm_head.weight")]
        out.append(params)
    return out


def bucket_numels(params: list[tuple[str, int]], dp: int, bucket_mb: float = 25.0,
                  tied_split: bool = False) -> list[int]:
    """Padded sizes of the DP gradient buckets of one chunk (mirrors parallel/data.py's layout)."""
    from ..parallel.data import sits_alone
    bucket_elems = max(1, int(float(bucket_mb) * 2**20 / 4))
    quantum = dp * _PAD_ELEMS
    groups, size, current = [], 0, []
    for name, numel in reversed(params):
        alone = sits_alone(name, tied_split)
        if current and (alone or size >= bucket_elems):
            groups.append(size)
            current, size = [], 0
        current.append(name)
        size += numel
        if alone:
            groups.append(size)
            current, size = [], 0
    if current:
        groups.append(size)
    return [-(-g // quantum) * quantum for g in groups]


def _add(out: dict, op: str, group: str, nbytes: float, calls: int = 1) -> None:
    if nbytes <= 0 and calls <= 0:
        return
    entry = out.setdefault((op, group), {"calls": 0, "bytes": 0})
    entry["calls"] += calls
    entry["bytes"] += int(nbytes)


def grad_wire_bytes(grad_reduce_dtype: str) -> int:
    """Bytes per gradient element the DP reduction sends (`parallel.grad_reduce_dtype`)."""
    return 2 if grad_reduce_dtype == "bf16" else 4


def expected_comm_bytes(cfg, world_size: int, rank: int = 0, act_bytes: int | None = None,
                        param_bytes: int = 4) -> dict:
    """{(op, group): {"calls", "bytes"}} that comm accounting records on `rank` for one optimizer step.

    Matches comm accounting exactly (bytes and calls) for DP, ZeRO-1, TP, SP and PP (1F1B/GPipe);
    tests/test_perf_comm.py checks it on real steps.
    """
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp = p.tp, p.pp
    dp = world_size // (tp * pp)
    tp_rank, pp_rank = rank % tp, rank // (tp * dp)
    vs = p.virtual_stages if pp > 1 else 1
    n_micro = t.global_batch // (t.micro_batch * dp)
    b, s, h = t.micro_batch, t.seq_len, m.hidden_size
    act = act_bytes or (2 if t.dtype == "bf16" else 4)
    first_stage, last_stage = pp_rank == 0, pp_rank == pp - 1
    out: dict = {}

    chunks = chunk_param_numels(m, tp, pp, pp_rank, vs, p.pp_layers, t.trainable, getattr(cfg, "lora", None))
    tied_split = m.tie_embeddings and pp > 1
    grad_bytes = grad_wire_bytes(p.grad_reduce_dtype)
    # ------------------------------------------------------------ DP (and scalars on dp)
    if dp > 1:
        _add(out, "all_reduce", "dp", 8)  # global token count (float64)
        for params in chunks:
            for numel in bucket_numels(params, dp, p.bucket_mb, tied_split):
                if p.zero == 1:
                    _add(out, "reduce_scatter", "dp", numel * grad_bytes)
                    _add(out, "all_gather", "dp", numel * param_bytes)
                else:
                    _add(out, "all_reduce", "dp", numel * grad_bytes)
        if p.zero == 1:
            _add(out, "all_reduce", "dp", 8)  # grad-norm partial sums
        if last_stage:
            _add(out, "all_reduce", "dp", 16)  # the step's metric sums (float64): loss and its token count
    if tp * pp > 1:
        _add(out, "all_reduce", "model", 8)  # grad norm
    # ------------------------------------------------------------ TP
    if tp > 1:
        bsh = b * s * h * act
        layers = sum(sum(1 for n, _ in c if n.endswith("input_layernorm.weight")) for c in chunks)
        has_embed = any(n == "embed_tokens.weight" for c in chunks for n, _ in c)
        has_head = any(n == "norm.weight" for c in chunks for n, _ in c)
        c, r = COLUMN_INPUTS_PER_LAYER, ROW_LINEARS_PER_LAYER
        for _ in range(n_micro):
            if p.sp:
                # forward: each block gathers its input once, each row-parallel linear
                # reduce-scatters its output; backward: the transposes (RS / AG) + one AG per
                # block to re-gather its input for the weight gradients.
                _add(out, "all_gather", "tp", bsh * (2 * c + r) * layers, (2 * c + r) * layers)
                _add(out, "reduce_scatter", "tp", bsh * (c + r) * layers, (c + r) * layers)
                if has_embed:  # forward RS, backward AG
                    _add(out, "reduce_scatter", "tp", bsh)
                    _add(out, "all_gather", "tp", bsh)
                if has_head:  # forward AG, backward re-gather AG + input-grad RS
                    _add(out, "all_gather", "tp", 2 * bsh, 2)
                    _add(out, "reduce_scatter", "tp", bsh)
            else:
                # forward: all-reduce of each row-parallel output; backward: of each block's input grad
                _add(out, "all_reduce", "tp", bsh * (c + r) * layers, (c + r) * layers)
                if has_embed:
                    _add(out, "all_reduce", "tp", bsh)
                if has_head:
                    _add(out, "all_reduce", "tp", bsh)
            if has_head:
                _add(out, "all_reduce", "tp", 3 * b * s * 4, 3)  # cross-entropy max, sum-exp, target logit
        if p.sp:
            norm_params = sum(k for c in chunks for n, k in c if n.endswith("norm.weight"))
            _add(out, "all_reduce", "tp", norm_params * 4)
    # ------------------------------------------------------------ PP
    if pp > 1:
        msg = b * (s // tp if (p.sp and tp > 1) else s) * h * act
        stages = pp * vs
        for v in range(vs):
            g = v * pp + pp_rank
            if g < stages - 1:  # forward output out, its gradient back in
                _add(out, "send", "pp", msg * n_micro, n_micro)
                _add(out, "recv", "pp", msg * n_micro, n_micro)
            if g > 0:
                _add(out, "recv", "pp", msg * n_micro, n_micro)
                _add(out, "send", "pp", msg * n_micro, n_micro)
        if tied_split and (first_stage or last_stage):
            emb = sum(k for c in chunks for n, k in c if n in ("embed_tokens.weight", "lm_head.weight"))
            _add(out, "all_reduce", "embedding", emb * 4 / (dp if p.zero == 1 else 1))
    del tp_rank
    return out


def total_bytes(table: dict, group: str | None = None) -> int:
    return int(sum(v["bytes"] for (op, g), v in table.items() if group is None or g == group))
