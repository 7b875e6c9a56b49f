"""A simple sampling loop (no KV cache): re-runs the model on the whole sequence per new token.

    ids = generate(model, prompt_ids, max_new_tokens=32, temperature=0.0)   # greedy
"""
from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             eos_id: int | None = None, generator: torch.Generator | None = None) -> list[int]:
    """prompt + up to max_new_tokens sampled ids (greedy at temperature 0, else nucleus sampling)."""
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    limit = int(getattr(model.cfg, "max_seq_len", 0) or 0)
    for _ in range(max_new_tokens):
        window = ids[-limit:] if limit else ids
        logits = model(torch.tensor([window], device=device))[0, -1, : model.cfg.vocab_size].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1).cpu()
            if top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < top_p  # smallest set whose mass reaches top_p
                sorted_p = sorted_p * keep
                probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
            nxt = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
        ids.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
    return ids
