"""Batched beam search with a KV cache: the k best beams of every image (k = beam size, as the DiCO reference)."""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache


@torch.no_grad()
def beam_search(model, memory: torch.Tensor, beam_size: int, max_len: int, bos: int, eos: int, pad: int):
    """Returns tokens [B, k, 1 + n] (BOS first, PAD after EOS) and summed log-probs [B, k], best beam first.

    A finished beam can only be extended with PAD at no cost, so finished and running beams compete on one score.
    The caller chooses train/eval mode (dropout); this function never changes it.
    """
    B, k = memory.size(0), beam_size
    memory = memory.repeat_interleave(k, dim=0)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    tokens = torch.full((B * k, 1), bos, dtype=torch.long, device=memory.device)
    scores = torch.full((B, k), float("-inf"), device=memory.device)
    scores[:, 0] = 0.0  # one live beam per image at the start, so the first expansion gives k distinct tokens
    finished = torch.zeros(B * k, dtype=torch.bool, device=memory.device)
    offsets = torch.arange(B, device=memory.device).unsqueeze(1) * k
    for _ in range(max_len):
        hidden = model.decode(tokens[:, -1:], memory, cache=cache)[:, -1]
        logp = torch.log_softmax(model.logits(hidden).float(), dim=-1)
        logp[:, [bos, pad]] = float("-inf")
        logp[finished] = float("-inf")
        logp[finished, pad] = 0.0
        V = logp.size(-1)
        top, idx = (scores.view(-1, 1) + logp).view(B, k * V).topk(k, dim=-1)
        src = (offsets + idx // V).view(-1)
        new = (idx % V).view(-1, 1)
        tokens = torch.cat([tokens[src], new], dim=1)
        finished = finished[src] | (new.squeeze(1) == eos)
        scores = top
        cache.reorder_cache(src)
        if finished.all():
            break
    return tokens.view(B, k, -1), scores
