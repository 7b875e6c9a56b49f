"""The one `forward_backward` every training loop calls (DESIGN rule 4).

    metrics = forward_backward(model_chunks, microbatches, loss_fn, mesh,
                               schedule=cfg.parallel.pp_schedule, loss_scale=1/global_tokens)

- `model_chunks`: this rank's chunks (one per virtual stage), as built by
  `parallel.build_model`; each is called as chunk(x, position_ids=, cu_seqlens=).
- `microbatches`: list of dicts (tokens, labels, loss_mask, position_ids,
  optional cu_seqlens, and anything a loss needs). Every pipeline stage gets
  the full dicts (all ranks read the same data): the first stage feeds
  `tokens`, later stages the hidden states received from the previous stage,
  and the last stage calls the loss.
- `loss_fn(output, microbatch) -> (loss, metrics)`: `loss` is a scalar whose
  gradient is taken after multiplying by `loss_scale`; `metrics` a dict of
  floats/0-d tensors reported back.
- returns the list of per-micro-batch metrics on the last pipeline stage
  (each with "loss" added), in micro-batch order; an empty list elsewhere.
- `forward_only=True` runs evaluation (no graph, no backward) on every schedule.
- `schedule`: "gpipe" | "1f1b" | "interleaved" (ignored when pp == 1).
- `trace`: optional dict filled with what the schedule did (for tests and
  `benchmarks/pipeline.py`): "ops" (this rank's op order), "max_live"
  (most micro-batches whose activations were alive, awaiting backward),
  "events" [(kind, chunk, microbatch, t_start, t_end)] of compute,
  "activation_shape" / "activation_bytes" (one stage-boundary tensor).

How the pipeline runs
---------------------
Each schedule is a static, per-rank list of compute ops ("F"|"B", virtual
chunk, micro-batch) — GPipe: all forwards then all backwards; 1F1B:
`pp - rank - 1` warm-up forwards, then one-forward-one-backward, then the
cool-down backwards (at most `pp - rank` micro-batches alive per stage);
interleaved 1F1B: Megatron's virtual-pipeline order over chunks (needs the
number of micro-batches divisible by pp). Virtual chunk `v` of rank `r` is
global stage `v * pp + r` (parallel/pipeline.py).

Because every rank can compute every other rank's op list, the order in
which a neighbour *sends* its messages to us is known up front. Receives
are posted in exactly that order (so matching is correct on gloo and NCCL
even when activations and gradients travel between the same two ranks, as
with interleaving on pp=2), one op ahead of need: after computing op k we
post, in one `batch_isend_irecv`, the send of op k's output together with
the receive of op k+2's input, so the transfer of op k+1's input overlaps
op k's compute. Sends are waited lazily (at the end), never blocking compute.

Shapes are known up front, no handshakes: the tensor between stages is
[micro_batch, seq_len, hidden] ([micro_batch, seq_len/tp, hidden] under
sequence parallelism with tp > 1), from the first micro-batch's `tokens`.
It always travels as fp32: under bf16 autocast a stage's output is cast to
fp32 to be sent, and the received gradient is cast back to the output's
dtype before backward (the residual stream is fp32 anyway).

Data parallelism: each chunk's backward runs inside its `no_sync()` except
that chunk's last backward of the step, so its gradient reduction starts as
soon as its last micro-batch is done (per chunk with interleaving).
"""
from __future__ import annotations

import contextlib
import time

import torch

from ..parallel import comm

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def _model_inputs(mb: dict) -> dict:
    return {"position_ids": mb.get("position_ids"), "cu_seqlens": mb.get("cu_seqlens")}


def _detach_metrics(loss: torch.Tensor, metrics: dict) -> dict:
    out = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
    out["loss"] = loss.detach()
    return out


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def forward_backward_no_pipelining(model_chunks, microbatches, loss_fn, mesh, *, forward_only=False,
                                   loss_scale: float = 1.0, autocast=None, trace: dict | None = None) -> list[dict]:
    (model,) = model_chunks
    autocast = autocast or contextlib.nullcontext
    results = []
    n = len(microbatches)
    for i, mb in enumerate(microbatches):
        last = i == n - 1
        sync = contextlib.nullcontext() if (last or forward_only) else getattr(model, "no_sync", contextlib.nullcontext)()
        with sync, torch.set_grad_enabled(not forward_only):
            with autocast():
                output = model(mb["tokens"], **_model_inputs(mb))
                loss, metrics = loss_fn(output, mb)
            if not forward_only:
                (loss * loss_scale).backward()
        results.append(_detach_metrics(loss, metrics))
    if trace is not None:
        trace.update(max_live=1 if n and not forward_only else 0, ops=[("F", 0, i) for i in range(n)])
    return results


# ---------------------------------------------------------------------------- op orders
def schedule_ops(schedule: str, pp: int, pp_rank: int, num_microbatches: int, num_chunks: int = 1,
                 forward_only: bool = False) -> list[tuple[str, int, int]]:
    """This rank's compute ops, in order: ("F"|"B", virtual chunk, micro-batch)."""
    m, vs = num_microbatches, num_chunks
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule={schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if schedule != "interleaved" and vs != 1:
        raise ValueError(f"{vs} virtual stages need parallel.pp_schedule=interleaved (got {schedule})")
    if schedule == "interleaved":
        if m % pp:
            raise ValueError(f"the interleaved schedule needs the number of micro-batches ({m}) divisible by "
                             f"parallel.pp={pp}; change train.global_batch or train.micro_batch")
        return _interleaved_ops(pp, pp_rank, m, vs, forward_only)
    if forward_only:
        return [("F", 0, i) for i in range(m)]
    if schedule == "gpipe":
        return [("F", 0, i) for i in range(m)] + [("B", 0, i) for i in range(m)]
    warmup = min(pp - pp_rank - 1, m)
    ops = [("F", 0, i) for i in range(warmup)]
    for i in range(m - warmup):
        ops += [("F", 0, warmup + i), ("B", 0, i)]
    ops += [("B", 0, i) for i in range(m - warmup, m)]
    return ops


def _interleaved_ops(pp: int, rank: int, m: int, vs: int, forward_only: bool) -> list:
    total = m * vs
    group = pp * vs

    def chunk_and_mb(k: int, forward: bool) -> tuple[int, int]:
        in_group = k % group
        chunk = in_group // pp
        if not forward:
            chunk = vs - 1 - chunk
        return chunk, (k // group) * pp + in_group % pp

    fwd = [("F", *chunk_and_mb(k, True)) for k in range(total)]
    if forward_only:
        return fwd
    bwd = [("B", *chunk_and_mb(k, False)) for k in range(total)]
    if m == pp:
        warmup = total  # one round only: nothing to overlap, all forwards first
    else:
        warmup = min((pp - rank - 1) * 2 + (vs - 1) * pp, total)
    ops = fwd[:warmup]
    for k in range(total - warmup):
        ops += [fwd[warmup + k], bwd[k]]
    ops += bwd[total - warmup:]
    return ops


# ---------------------------------------------------------------------------- messages
def _messages_from(ops: list, pp: int, rank: int, num_stages: int) -> dict[int, list]:
    """Messages a rank sends, per destination pp rank, in send order: ("act"|"grad", dst_stage, mb)."""
    out: dict[int, list] = {}
    for kind, v, i in ops:
        stage = v * pp + rank
        if kind == "F" and stage < num_stages - 1:
            out.setdefault((stage + 1) % pp, []).append(("act", stage + 1, i))
        elif kind == "B" and stage > 0:
            out.setdefault((stage - 1) % pp, []).append(("grad", stage - 1, i))
    return out


class _P2P:
    """Receives posted in the sender's order, sends waited lazily; all through comm.batch_isend_irecv."""

    def __init__(self, mesh, streams: dict[int, list], shape, device):
        self.mesh, self.shape, self.device = mesh, tuple(shape), device
        self.streams = streams                    # sender pp rank -> its messages to me, in order
        self.cursor = {peer: 0 for peer in streams}
        self.posted: dict = {}                    # message -> (buffer, requests)
        self.sends: list = []

    def _post_ops(self, key, peer) -> list:
        """Recv ops to post so that `key` (from `peer`) is posted, keeping the sender's order."""
        ops = []
        stream = self.streams.get(peer, [])
        while key not in self.posted and self.cursor[peer] < len(stream):
            msg = stream[self.cursor[peer]]
            self.cursor[peer] += 1
            buf = torch.empty(self.shape, dtype=torch.float32, device=self.device)
            self.posted[msg] = (buf, None)
            ops.append(("recv", buf, self.mesh.pp_ranks[peer], msg))
        if key not in self.posted:
            raise RuntimeError(f"pipeline schedule error: {key} is never sent by pp rank {peer}")
        return ops

    def exchange(self, send: tuple | None, recvs: list[tuple]) -> None:
        """One batch: an optional send (tensor, peer) and the receives for messages [(key, peer)]."""
        ops, keys = [], []
        if send is not None:
            tensor, peer = send
            ops.append(("send", tensor, self.mesh.pp_ranks[peer]))
        for key, peer in recvs:
            if key in self.posted:
                continue
            for kind, buf, rank, msg in self._post_ops(key, peer):
                ops.append((kind, buf, rank))
                keys.append(msg)
        if not ops:
            return
        reqs = comm.batch_isend_irecv(ops, group=self.mesh.pp_group)
        # batch_isend_irecv returns one request per op on gloo; on some backends only one for the batch.
        if len(reqs) != len(ops):
            for msg in keys:
                self.posted[msg] = (self.posted[msg][0], reqs)
            if send is not None:
                self.sends.append((send[0], reqs))
            return
        start = 0
        if send is not None:
            self.sends.append((send[0], [reqs[0]]))
            start = 1
        for msg, req in zip(keys, reqs[start:]):
            self.posted[msg] = (self.posted[msg][0], [req])

    def get(self, key, peer) -> torch.Tensor:
        if key not in self.posted:
            self.exchange(None, [(key, peer)])
        buf, reqs = self.posted.pop(key)
        comm.wait_all(reqs)
        return buf

    def finish(self) -> None:
        for _, reqs in self.sends:
            comm.wait_all(reqs)
        self.sends.clear()
        if self.posted:
            raise RuntimeError(f"pipeline schedule error: messages received but never used: {sorted(self.posted)}")


def _sequence_parallel(chunks) -> bool:
    for chunk in chunks:
        module = _unwrap(chunk)
        if getattr(module, "sequence_parallel", False):
            return True
        if any(getattr(spec, "sequence_parallel", False) for spec in getattr(module, "param_specs", {}).values()):
            return True
    return False


def activation_shape(model_chunks, microbatch: dict, mesh, sequence_parallel: bool | None = None) -> tuple:
    """Shape of the tensor between two stages: [b, s, h], or [b, s/tp, h] under sequence parallelism."""
    b, s = microbatch["tokens"].shape[:2]
    if sequence_parallel is None:
        sequence_parallel = _sequence_parallel(model_chunks)
    if sequence_parallel and mesh.tp > 1:
        s //= mesh.tp
    return (b, s, _unwrap(model_chunks[0]).cfg.hidden_size)


# ---------------------------------------------------------------------------- pipelined
def forward_backward_pipelining(model_chunks, microbatches, loss_fn, mesh, *, schedule: str = "1f1b",
                                forward_only=False, loss_scale: float = 1.0, autocast=None,
                                trace: dict | None = None, sequence_parallel: bool | None = None) -> list[dict]:
    autocast = autocast or contextlib.nullcontext
    pp, rank, vs, m = mesh.pp, mesh.pp_rank, len(model_chunks), len(microbatches)
    num_stages = pp * vs
    if m == 0:
        return []
    all_ops = [schedule_ops(schedule, pp, r, m, vs, forward_only) for r in range(pp)]
    ops = all_ops[rank]
    streams = {}
    for peer in range(pp):
        msgs = _messages_from(all_ops[peer], pp, peer, num_stages).get(rank)
        if msgs:
            streams[peer] = msgs
    shape = activation_shape(model_chunks, microbatches[0], mesh, sequence_parallel)
    p2p = _P2P(mesh, streams, shape, mesh.device)

    def needs(op):
        """The message op needs before it can run, and its sender: None for the first stage / last stage's B."""
        kind, v, i = op
        stage = v * pp + rank
        if kind == "F" and stage > 0:
            return ("act", stage, i), (stage - 1) % pp
        if kind == "B" and stage < num_stages - 1:
            return ("grad", stage, i), (stage + 1) % pp
        return None

    last_backward = {}
    for k, (kind, v, _) in enumerate(ops):
        if kind == "B":
            last_backward[v] = k

    results: dict[int, dict] = {}
    saved: dict = {}           # (chunk, mb) -> (input tensor, output tensor) awaiting backward
    max_live = 0
    events = []
    lookahead = [n for n in (needs(op) for op in ops[:2]) if n is not None]
    p2p.exchange(None, lookahead)

    with torch.set_grad_enabled(not forward_only):
        for k, op in enumerate(ops):
            kind, v, i = op
            stage = v * pp + rank
            chunk, mb = model_chunks[v], microbatches[i]
            need = needs(op)
            incoming = p2p.get(*need) if need is not None else None
            t0 = time.perf_counter()
            send = None
            if kind == "F":
                if stage == 0:
                    x = mb["tokens"]
                else:
                    x = incoming.requires_grad_(not forward_only)
                with autocast():
                    out = chunk(x, **_model_inputs(mb))
                    if stage == num_stages - 1:
                        loss, metrics = loss_fn(out, mb)
                if stage == num_stages - 1:
                    results[i] = _detach_metrics(loss, metrics)
                    out = loss * loss_scale
                else:
                    send = (out.detach().float().contiguous(), (stage + 1) % pp)
                if not forward_only:
                    saved[(v, i)] = (x, out)
                    max_live = max(max_live, len(saved))
            else:
                x, out = saved.pop((v, i))
                grad = None if incoming is None else incoming.to(out.dtype)
                sync = contextlib.nullcontext() if k == last_backward[v] else \
                    getattr(chunk, "no_sync", contextlib.nullcontext)()
                with sync:
                    torch.autograd.backward(out, grad_tensors=grad)
                if stage > 0:
                    send = (x.grad.float().contiguous(), (stage - 1) % pp)
                del x, out
            events.append((kind, v, i, t0, time.perf_counter()))
            nxt = needs(ops[k + 2]) if k + 2 < len(ops) else None
            p2p.exchange(send, [nxt] if nxt is not None else [])
    p2p.finish()

    if trace is not None:
        elem = torch.empty((), dtype=torch.float32).element_size()
        numel = 1
        for d in shape:
            numel *= d
        trace.update(ops=ops, max_live=max_live, events=events, activation_shape=shape,
                     activation_bytes=numel * elem)
    if not (mesh.is_last_stage):
        return []
    return [results[i] for i in range(m)]


def forward_backward(model_chunks, microbatches, loss_fn, mesh, *, schedule: str = "1f1b", forward_only=False,
                     loss_scale: float = 1.0, autocast=None, trace: dict | None = None,
                     sequence_parallel: bool | None = None) -> list[dict]:
    microbatches = list(microbatches)
    if mesh.pp == 1:
        if len(model_chunks) != 1:
            raise ValueError(f"pp=1 takes one model chunk, got {len(model_chunks)} (virtual stages need pp > 1)")
        return forward_backward_no_pipelining(model_chunks, microbatches, loss_fn, mesh, forward_only=forward_only,
                                              loss_scale=loss_scale, autocast=autocast, trace=trace)
    if len(model_chunks) > 1 and schedule != "interleaved":
        raise ValueError(f"{len(model_chunks)} model chunks need schedule='interleaved', got {schedule!r}")
    return forward_backward_pipelining(model_chunks, microbatches, loss_fn, mesh, schedule=schedule,
                                       forward_only=forward_only, loss_scale=loss_scale, autocast=autocast,
                                       trace=trace, sequence_parallel=sequence_parallel)
