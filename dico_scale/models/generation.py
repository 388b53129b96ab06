"""Batched generation with a KV cache: the k best beams of every image (k = beam size, as the DiCO reference), or k
independent samples of every image (SCST)."""
from __future__ import annotations

import torch


@torch.no_grad()
def beam_search(model, memory: torch.Tensor, beam_size: int, max_len: int, bos: int, eos: int, pad: int):
    """Returns tokens [B, k, 1 + n] (BOS first, PAD after EOS) and summed log-probs [B, k], best beam first.
    `model`: a captioner (models/captioner.py), `memory`: its per-image context [B, ...] (model.image_context).

    A finished beam can only be extended with PAD at no cost, so finished and running beams compete on one score.
    The caller chooses train/eval mode (dropout); this function never changes it.
    """
    B, k = memory.size(0), beam_size
    memory, cache, banned = model.expand(memory, k), model.new_cache(), model.banned_tokens(bos, eos, pad)
    tokens = torch.full((B * k, 1), bos, dtype=torch.long, device=memory.device)
    scores = torch.full((B, k), float("-inf"), device=memory.device)
    scores[:, 0] = 0.0  # one live beam per image at the start, so the first expansion gives k distinct tokens
    finished = torch.zeros(B * k, dtype=torch.bool, device=memory.device)
    offsets = torch.arange(B, device=memory.device).unsqueeze(1) * k
    for _ in range(max_len):
        hidden = model.decoder_hidden(tokens[:, -1:], memory, cache=cache)[:, -1]
        logp = torch.log_softmax(model.logits(hidden).float(), dim=-1)
        logp[:, banned] = float("-inf")
        logp[finished] = float("-inf")
        logp[finished, pad] = 0.0
        V = logp.size(-1)
        top, idx = (scores.view(-1, 1) + logp).view(B, k * V).topk(k, dim=-1)
        src = (offsets + idx // V).view(-1)
        new = (idx % V).view(-1, 1)
        tokens = torch.cat([tokens[src], new], dim=1)
        finished = finished[src] | (new.squeeze(1) == eos)
        scores = top
        model.reorder_cache(cache, src)
        if finished.all():
            break
    return tokens.view(B, k, -1), scores


@torch.no_grad()
def sample(model, memory: torch.Tensor, k: int, max_len: int, bos: int, eos: int, pad: int, temperature: float = 1.0,
           top_k: int = 0, generator: torch.Generator | None = None):
    """k independent samples per image: tokens [B, k, 1 + n] (BOS first, PAD after EOS) and summed log-probs [B, k].

    Each step draws from softmax(logits / temperature) over the top_k most likely tokens (0: all), BOS and PAD
    excluded (unless equal to EOS). The log-probs are those of the sampled tokens under the untempered, unfiltered
    policy (log-softmax over the whole vocabulary, as beam_search scores and teacher forcing give): temperature and top-k only shape the
    proposal, and a policy-gradient loss needs log pi(y | x). `generator` (on memory's device) makes draws
    reproducible; None uses the global RNG. The caller chooses train/eval mode.
    """
    B = memory.size(0)
    memory, cache, banned = model.expand(memory, k), model.new_cache(), model.banned_tokens(bos, eos, pad)
    tokens = torch.full((B * k, 1), bos, dtype=torch.long, device=memory.device)
    scores = torch.zeros(B * k, device=memory.device)
    finished = torch.zeros(B * k, dtype=torch.bool, device=memory.device)
    for _ in range(max_len):
        hidden = model.decoder_hidden(tokens[:, -1:], memory, cache=cache)[:, -1]
        logp = torch.log_softmax(model.logits(hidden).float(), dim=-1)
        logp[:, banned] = float("-inf")
        proposal, ids = logp.topk(min(top_k, logp.size(-1)), dim=-1) if top_k else (logp, None)
        pick = torch.multinomial(torch.softmax(proposal / temperature, dim=-1), 1, generator=generator)
        new = (pick if ids is None else ids.gather(-1, pick)).squeeze(-1)
        scores += torch.where(finished, 0.0, logp.gather(-1, new[:, None]).squeeze(-1))
        new = new.masked_fill(finished, pad)
        tokens = torch.cat([tokens, new[:, None]], dim=1)
        finished |= new == eos
        if finished.all():
            break
    return tokens.view(B, k, -1), scores.view(B, k)
