"""Incremental decoding with a KV cache on the TRAINING layout (no second copy of the weights).

    from megatron_jinpan.posttrain.generation import generate
    out = generate(chunks, mesh, prompts, max_new_tokens=64, greedy=False, temperature=1.0, top_p=0.9, seed=7)
    out.responses[i], out.logprobs[i], out.finished[i]

Called by every rank of one data-parallel replica with that replica's prompts
(the same list on its tp/pp ranks); results come back on every rank of the
replica. `chunks` are this rank's model chunks as built by `build_model` (or
`load_parallel_model`), so PPO rollouts come from the weights being trained.

How it runs on the mesh
-----------------------
- Tensor parallelism: the attention of each rank runs on its local heads, so
  each rank's KV cache (models/kv_cache.py) holds only its local kv heads.
  The last stage gathers the logits of the LAST position only ([b, vocab])
  over TP to sample; every TP rank samples the same token (the sampled ids
  are broadcast from TP rank 0 so they cannot diverge).
- Sequence parallelism is switched off while generating: a decode step has
  one token per sequence, which cannot be split over TP ranks. SP only
  changes where activations live during training (the math is the same:
  norms are per token, the weights identical), so turning the modules'
  `sequence_parallel` flags off for the duration gives the same results; it
  is restored afterwards.
- Pipeline parallelism: the replica's prompts are cut into micro-batches
  (default: `pp`); in each decode step stage 0 embeds micro-batch 0 and sends
  its hidden states on, then starts micro-batch 1 while stage 1 works on 0,
  and so on (send is asynchronous), so the stages overlap across
  micro-batches. Virtual stages (interleaved) work the same, chunk by chunk.
  At the end of the step the last stage broadcasts the new tokens (and their
  log-probs) to the whole pipeline, so every rank knows which sequences have
  finished and all ranks stop together.
- Data parallelism: each replica generates its own prompts independently.

Batches of prompts of different lengths are LEFT-padded per micro-batch;
position ids count real tokens only (0 at each prompt's first token) and
padded keys are masked, so a prompt gives the same continuation alone or in
a batch. Each sequence stops at its first EOS (included in its response);
`finished[i]` is False when it hit `max_new_tokens` first.

Log-probs are those of the sampled token under softmax(logits / temperature)
over the whole (unpadded) vocabulary, i.e. what the training forward at that
temperature gives (top-k/top-p only restrict which token is drawn).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..models.kv_cache import KVCache
from ..parallel import comm, mappings
from ..parallel.parallelize import unwrap


class GenerationError(ValueError):
    """A bad request (prompt, length, sampling option); the message names the fix."""

    user_facing = True


@dataclass
class GenerationOutput:
    responses: list[list[int]]    # generated ids (EOS included when reached), no prompt
    logprobs: list[list[float]]   # log-prob of each response token at the sampling temperature
    finished: list[bool]          # True when the response ended with EOS


# ---------------------------------------------------------------- sampling
def sample_next(logits: torch.Tensor, *, greedy: bool, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [b], logprobs [b]) from full-vocab logits [b, V] (fp32)."""
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    logprobs = torch.log_softmax(scaled, dim=-1)
    if greedy:
        tokens = logits.argmax(dim=-1)
    else:
        filtered = scaled
        if top_k and 0 < top_k < filtered.shape[-1]:
            kth = torch.topk(filtered, top_k, dim=-1).values[..., -1:]
            filtered = filtered.masked_fill(filtered < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = filtered.sort(dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs      # the top token always stays
            drop = (mass_before >= top_p).scatter(-1, order, mass_before >= top_p)
            filtered = filtered.masked_fill(drop, float("-inf"))
        probs = torch.softmax(filtered, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


# ---------------------------------------------------------------- batching
@dataclass
class _MicroBatch:
    rows: list[int]                    # indices into the replica's prompts
    tokens: torch.Tensor               # [b, P] left-padded prompt, then [b, 1] per step
    valid: torch.Tensor | None         # [b, s] False on padding; None: no padding
    positions: torch.Tensor            # [b, s]
    caches: list[KVCache]              # one per local chunk
    finished: torch.Tensor             # [b] bool (CPU)
    new_tokens: list                   # per step: [b] ids (CPU), finished rows included
    new_logprobs: list                 # per step: [b] log-probs (CPU)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, valid, position_ids) [b, max_len] for prompts left-padded to the longest one."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        valid[i, width - len(p):] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    return tokens.to(device), valid.to(device), positions.to(device)


@contextlib.contextmanager
def sequence_parallel_off(modules):
    """Run with every `sequence_parallel` flag False (decode steps have 1 token; see the docstring)."""
    changed = [m for chunk in modules for m in chunk.modules() if getattr(m, "sequence_parallel", False)]
    for m in changed:
        m.sequence_parallel = False
    try:
        yield
    finally:
        for m in changed:
            m.sequence_parallel = True


def check_sampling(max_new_tokens: int, greedy: bool, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not greedy and temperature <= 0:
        raise GenerationError(f"temperature={temperature} must be > 0 when sampling (or use greedy)")
    if top_k < 0:
        raise GenerationError(f"top_k={top_k} must be >= 0 (0 = no top-k filter)")
    if not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p={top_p} must be in (0, 1]")


def check_prompts(prompts, vocab_size: int, max_seq_len: int, max_new_tokens: int) -> None:
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        if min(p) < 0 or max(p) >= vocab_size:
            raise GenerationError(f"prompt {i} has token ids outside [0, {vocab_size}) (model.vocab_size); "
                             f"was it encoded with another tokenizer?")
        if len(p) + max_new_tokens > max_seq_len:
            raise GenerationError(f"prompt {i} has {len(p)} tokens + max_new_tokens={max_new_tokens} > "
                             f"model.max_seq_len={max_seq_len}; shorten the prompt or lower max_new_tokens")


# ---------------------------------------------------------------- the generator
# inference_mode, not no_grad: no version counters or view tracking on the ~50 small ops per layer and
# token (measured ~15% of a batch-1 decode step of the tiny model on CPU). Safe because nothing made
# here outlives the call except Python lists.
@torch.inference_mode()
def generate(chunks, mesh, prompts: list[list[int]], *, max_new_tokens: int = 64, greedy: bool = True,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = 2, seed: int = 0,
             num_microbatches: int | None = None, autocast=None) -> GenerationOutput:
    """Continue each prompt (token ids) by up to `max_new_tokens` tokens; see the module docstring."""
    modules = [unwrap(c) for c in chunks]
    cfg = modules[0].cfg
    check_sampling(max_new_tokens, greedy, temperature, top_k, top_p)
    if temperature <= 0:
        temperature = 1.0  # greedy: log-probs at temperature 1
    if mesh.is_last_stage and getattr(modules[-1], "lm_head", None) is None:
        raise GenerationError("generation needs a language-model head (model.head=lm), not a value head")
    check_prompts(prompts, cfg.vocab_size, cfg.max_seq_len, max_new_tokens)
    if not prompts:
        return GenerationOutput([], [], [])
    autocast = autocast or contextlib.nullcontext
    device = mesh.device
    pp, rank = mesh.pp, mesh.pp_rank
    num_stages = pp * len(modules)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))

    n = len(prompts)
    m_count = max(1, min(num_microbatches or pp, n))
    bounds = [round(i * n / m_count) for i in range(m_count + 1)]
    mbs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rows = list(range(lo, hi))
        tokens, valid, positions = left_pad([prompts[r] for r in rows], eos_id if eos_id is not None else 0, device)
        padded = len({len(prompts[r]) for r in rows}) > 1
        caches = [KVCache(len(rows), tokens.shape[1] + max_new_tokens, device, last_position_only=True)
                  for _ in modules]
        mbs.append(_MicroBatch(rows, tokens, valid if padded else None, positions, caches,
                               torch.zeros(len(rows), dtype=torch.bool), [], []))
    prev_rank = mesh.pp_ranks[(rank - 1) % pp] if pp > 1 else None
    next_rank = mesh.pp_ranks[(rank + 1) % pp] if pp > 1 else None
    hidden = cfg.hidden_size

    with sequence_parallel_off(modules):
        for _ in range(max_new_tokens):
            active = [mb for mb in mbs if not bool(mb.finished.all())]
            if not active:
                break
            sends = []
            step_out = []  # (tokens, logprobs) per active micro-batch, on the last stage
            for mb in active:
                x = mb.tokens
                for v, chunk in enumerate(modules):
                    stage = v * pp + rank
                    if stage > 0:
                        x = torch.empty((len(mb.rows), mb.tokens.shape[1], hidden), dtype=torch.float32, device=device)
                        comm.wait_all(comm.batch_isend_irecv([("recv", x, prev_rank)], group=mesh.pp_group))
                    mb.caches[v].begin(mb.valid, mb.tokens.shape[1])
                    with autocast():
                        out = chunk(x, position_ids=mb.positions, kv_cache=mb.caches[v])
                    if stage < num_stages - 1:
                        buf = out.float().contiguous()
                        sends.append((buf, comm.batch_isend_irecv([("send", buf, next_rank)], group=mesh.pp_group)))
                    else:
                        step_out.append(_sample(out[:, -1], cfg.vocab_size, mesh, greedy, temperature, top_k,
                                                top_p, generator))
            for _, reqs in sends:
                comm.wait_all(reqs)
            new_tokens, new_logprobs = _share_step(step_out, [len(mb.rows) for mb in active], mesh)
            offset = 0
            for mb in active:
                b = len(mb.rows)
                tok, lp = new_tokens[offset:offset + b], new_logprobs[offset:offset + b]
                offset += b
                mb.new_tokens.append(tok)
                mb.new_logprobs.append(lp)
                if eos_id is not None:
                    mb.finished |= tok == eos_id
                # The next step feeds the new token of every row (finished rows too: their output is ignored).
                mb.positions = mb.positions[:, -1:] + 1
                mb.tokens = tok.to(device=device, dtype=torch.long)[:, None]
                mb.valid = None
    return _collect(mbs, n, eos_id)


def _collect(mbs, n: int, eos_id) -> GenerationOutput:
    """Each row's tokens up to and including its first EOS."""
    out = GenerationOutput([[] for _ in range(n)], [[] for _ in range(n)], [False] * n)
    for mb in mbs:
        tokens = torch.stack(mb.new_tokens, dim=1).tolist()
        logprobs = torch.stack(mb.new_logprobs, dim=1).tolist()
        for j, r in enumerate(mb.rows):
            ids = tokens[j]
            done = eos_id is not None and eos_id in ids
            end = ids.index(eos_id) + 1 if done else len(ids)
            out.responses[r], out.logprobs[r], out.finished[r] = ids[:end], logprobs[j][:end], done
    return out


def _sample(last_logits, vocab_size, mesh, greedy, temperature, top_k, top_p, generator):
    """Gather the last position's vocab-parallel logits over TP, sample, make TP ranks agree."""
    logits = last_logits.float().contiguous()
    if mesh.tp > 1:
        logits = mappings.gather_dim(logits, mesh.tp_group, -1)
    logits = logits[:, :vocab_size]
    tokens, lps = sample_next(logits, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator)
    if mesh.tp > 1 and not greedy:
        packed = torch.stack([tokens.double(), lps.double()])
        comm.broadcast(packed, mesh.global_rank(mesh.pp_rank, mesh.dp_rank, 0), mesh.tp_group)
        tokens, lps = packed[0].long(), packed[1].float()
    return tokens, lps


def _share_step(step_out, sizes, mesh):
    """The step's new tokens and log-probs of every active micro-batch, on every pipeline rank."""
    if mesh.pp == 1:  # already here: no packing for a broadcast
        return torch.cat([t for t, _ in step_out]).cpu(), torch.cat([lp for _, lp in step_out]).float().cpu()
    total = sum(sizes)
    packed = torch.empty((2, total), dtype=torch.float64, device=mesh.device)
    if mesh.is_last_stage:
        packed[0] = torch.cat([t for t, _ in step_out]).double()
        packed[1] = torch.cat([lp for _, lp in step_out]).double()
    if mesh.pp > 1:
        comm.broadcast(packed, mesh.pp_ranks[-1], mesh.pp_group)
    return packed[0].long().cpu(), packed[1].float().cpu()


def single_device_mesh(device="cpu"):
    """A (1, 1, 1) mesh without process groups, to generate with a plain single-device `Llama`:
    generate([model], single_device_mesh(), prompts)."""
    from ..parallel.mesh import ParallelMesh

    return ParallelMesh(tp=1, pp=1, dp=1, rank=0, world_size=1, device=torch.device(device))


# ---------------------------------------------------------------- reference decoding (tests, benchmarks)
@torch.no_grad()
def generate_without_cache(model, prompts: list[list[int]], *, max_new_tokens: int = 64,
                           eos_id: int | None = 2) -> GenerationOutput:
    """Greedy decoding of a single-device Llama by re-running `model(tokens)` on the whole sequence
    for every new token, one prompt at a time: the ground truth the KV-cache generator must match."""
    device = next(model.parameters()).device
    out = GenerationOutput([], [], [])
    for prompt in prompts:
        ids, lps, done = list(prompt), [], False
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids], device=device))[0, -1, : model.cfg.vocab_size].float()
            token = int(logits.argmax())
            lps.append(float(torch.log_softmax(logits, dim=-1)[token]))
            ids.append(token)
            if eos_id is not None and token == eos_id:
                done = True
                break
        out.responses.append(ids[len(prompt):])
        out.logprobs.append(lps)
        out.finished.append(done)
    return out
