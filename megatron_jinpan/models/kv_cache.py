"""Key/value cache for incremental decoding, single-device like the rest of models/.

    cache = KVCache(batch=4, max_len=prompt_len + max_new_tokens)
    cache.begin(valid)                  # [b, s] bool: real tokens of this step (False = left padding)
    logits = model(tokens, position_ids=pos, kv_cache=cache)   # Llama.forward calls cache.end()
    cache.begin(None, step_len=1)       # next step: one real token per sequence
    logits = model(next_tokens, position_ids=pos[:, -1:] + 1, kv_cache=cache)

One cache serves one model chunk (a pipeline stage holds its layers only)
and one batch. Each layer's buffers are allocated on the first write from
the shape of the keys it receives, so under tensor parallelism the cache
holds exactly the rank's local kv heads without knowing about TP.

Keys/values are stored [b, kv_heads, max_len, head_dim] (the layout attention
reads, so a decode step writes one column in place and never copies the
past). `key_valid` marks real tokens: a batch of prompts of different lengths
is left-padded and the pads are never attended to. A padded query may only
see itself (its output is never used; this keeps the softmax finite).
Without any padding no mask is built at all (SDPA's causal path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    def __init__(self, batch: int, max_len: int, device=None, last_position_only: bool = False):
        self.batch, self.max_len = batch, max_len
        self.device = device
        # True: the last stage's norm/head run on each step's last position only (logits [b, 1, V]),
        # all a sampler reads; False: logits for every position of the step (tests compare them).
        self.last_position_only = last_position_only
        self.length = 0                        # positions filled so far
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None  # [b, 1, s, length + s] for the step in progress (None: causal)
        self.causal = False
        self.padded = False                    # some key so far is padding
        self.step_len = 0
        self.begun = False

    def begin(self, valid: torch.Tensor | None, step_len: int | None = None) -> None:
        """Start a step of new tokens: `valid` [b, s] is False on (left) padding; None = no padding
        (then give `step_len`)."""
        s = valid.shape[1] if valid is not None else int(step_len)
        start, end = self.length, self.length + s
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full ({start} used, {s} more asked)")
        self.key_valid[:, start:end] = True if valid is None else valid.to(self.key_valid.device)
        self.padded = self.padded or valid is not None
        self.step_len = s
        self.causal = False
        if not self.padded and (s == 1 or start == 0):
            # No padding anywhere: plain causal attention (a single new query sees every key).
            self.mask, self.causal = None, s > 1
        elif s == 1:
            self.mask = self.key_valid[:, None, None, :end]
        else:
            keys = torch.arange(end, device=self.key_valid.device)
            queries = torch.arange(start, end, device=self.key_valid.device)
            mask = (keys[None, :] <= queries[:, None])[None] & self.key_valid[:, None, :end]   # [b, s, end]
            mask = mask | (keys[None, None, :] == queries[None, :, None])                    # a pad sees itself
            self.mask = mask[:, None]
        self.begun = True

    def update(self, layer: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v [b, s, h, d] of `layer`; return all keys/values so far [b, h, end, d]."""
        if not self.begun:
            raise RuntimeError("KVCache.begin(valid) must be called before a forward with the cache")
        if layer not in self.keys:
            b, _, h, d = k.shape
            shape = (b, h, self.max_len, d)
            self.keys[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.values[layer] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        start, end = self.length, self.length + self.step_len
        kc, vc = self.keys[layer], self.values[layer]
        kc[:, :, start:end] = k.transpose(1, 2)
        vc[:, :, start:end] = v.transpose(1, 2)
        return kc[:, :, :end], vc[:, :, :end]

    def end(self) -> None:
        """Finish the step: the new positions become part of the past."""
        self.length += self.step_len
        self.mask, self.step_len, self.begun = None, 0, False

    def layer(self, name: str) -> "LayerCache":
        return LayerCache(self, name)


class LayerCache:
    """What one attention layer sees of the cache."""

    def __init__(self, cache: KVCache, name: str):
        self.cache, self.name = cache, name

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this step's k/v [b, s, hkv, d] and attend q [b, s, hq, d] to every key so far."""
        keys, values = self.cache.update(self.name, k, v)
        return cached_attention(q, keys, values, self.cache.mask, self.cache.causal)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     causal: bool = False) -> torch.Tensor:
    """q [b, s, hq, d]; k, v [b, hkv, L, d] from the cache; mask [b, 1, s, L] (True = attend) or None with
    `causal`. Returns [b, s, hq, d]."""
    qt = q.transpose(1, 2)
    gqa = k.shape[1] != qt.shape[1]
    out = F.scaled_dot_product_attention(qt, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                         enable_gqa=gqa)
    return out.transpose(1, 2)
