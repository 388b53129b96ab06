"""Batched generation with a KV cache: the k best beams of every image (k = beam size; transformers' beam search, as
the DiCO reference), or k independent samples of every image (SCST)."""
from __future__ import annotations

import copy

import torch

from .folders import SEARCH_OPTIONS


@torch.no_grad()
def beam_search(model, memory: torch.Tensor, beam_size: int, max_len: int, bos: int, eos: int, pad: int,
                length_penalty: float = 1.0, early_stopping: bool | str = False, repetition_penalty: float = 1.0,
                no_repeat_ngram_size: int = 0):
    """Returns tokens [B, k, 1 + n] (BOS first, PAD after EOS) and summed log-probs [B, k], best first.
    `model`: a captioner (models/captioner.py), `memory`: its per-image context [B, ...] (model.image_context).

    transformers' beam search (`generate(num_beams=k, num_return_sequences=k)`, which the DiCO reference draws its
    candidates with): k beams keep running; a candidate that ends (EOS, or max_len tokens) among the step's k best
    is set aside, and the k best of those set aside, by summed log-prob / length ** length_penalty (length: generated
    tokens, EOS included), are returned. The search stops at max_len, or earlier by generate's `early_stopping`:
    False, once no running beam, scored at its current length, beats the worst of a full set (transformers'
    heuristic); "never", the same with a running beam scored at max_len when length_penalty > 0 (where a longer
    candidate scores higher); True, also as soon as k candidates are set aside. k = 1 is greedy search, as
    generate's num_beams=1. generate's repetition_penalty and no_repeat_ngram_size shape the search as its logits
    processors do (`processed`: beam search's log-probs, greedy search's logits); the sums returned are the scores
    the search ranked by. The caller chooses train/eval mode.
    """
    stop = str(early_stopping).lower()  # generate's True / False / "never"; configs hold "true" / "false" / "never"
    if stop not in ("false", "true", "never"):
        raise ValueError(f"early_stopping {early_stopping!r} is not false, true or never")
    B, k, dev = memory.size(0), beam_size, memory.device
    length_penalty = length_penalty if k > 1 else 0.0  # one beam, ranked by its sum: the first to end is the argmax
    options = (repetition_penalty, no_repeat_ngram_size)
    options = options if options != (1.0, 0) else None  # generate's logits processors, when asked for
    history = model.context_tokens(memory) if options else None  # generate's input_ids before BOS (a VLM's prompt)
    if history is None:
        history = torch.empty(B, 0, dtype=torch.long, device=dev)
    history = history.repeat_interleave(k, 0)
    memory, cache, banned = model.expand(memory, k), model.new_cache(), model.banned_tokens(bos, eos, pad)
    rows = torch.arange(B, device=dev)[:, None]
    running = torch.full((B, k, max_len + 1), pad, dtype=torch.long, device=dev)
    running[..., 0] = bos
    run_scores = torch.zeros(B, k, device=dev)
    run_scores[:, 1:] = -1e9  # one live beam per image at the start, so the first expansion gives k distinct tokens
    done, done_scores = running.clone(), torch.full((B, k), -1e9, device=dev)  # the k best ended candidates
    done_sums, done_lens = torch.zeros(B, k, device=dev), torch.zeros(B, k, dtype=torch.long, device=dev)
    done_real = torch.zeros(B, k, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    full = torch.zeros(B, 1, dtype=torch.bool, device=dev)  # early_stopping true: k set aside, no more taken
    in_top_k = torch.arange(2 * k, device=dev) < k
    for t in range(1, max_len + 1):
        hidden = model.decoder_hidden(running.view(B * k, -1)[:, t - 1:t], memory, cache=cache)[:, -1]
        logits = model.logits(hidden).float()
        seen = torch.cat([history, running.view(B * k, -1)[:, :t]], 1) if options else None
        if options and k == 1:  # greedy search: generate processes the logits
            logits = processed(logits, seen, *options)
        logp = torch.log_softmax(logits, dim=-1)
        logp[:, banned] = float("-inf")
        if options and k > 1:  # beam search: generate processes the log-probs
            logp = processed(logp, seen, *options)
        V = logp.size(-1)
        # 2k continuations: enough that k of them are still running even if the k best all end with EOS
        top, idx = (run_scores.view(-1, 1) + logp).view(B, k * V).topk(2 * k, dim=-1)
        beam, token = idx // V, idx % V
        cands = running[rows, beam]
        cands[..., t] = token
        ends = (token == eos) | (t == max_len)
        # set aside: the ended candidates among the k best, while the image's set can still improve
        ended = ends & in_top_k & improvable & ~full
        score = top / t ** length_penalty + (~ended) * -1e9
        best = torch.cat([done_scores, score], 1).topk(k, dim=1).indices
        done = torch.cat([done, cands], 1)[rows, best]
        done_scores = torch.cat([done_scores, score], 1)[rows, best]
        done_sums = torch.cat([done_sums, top], 1)[rows, best]
        done_lens = torch.cat([done_lens, torch.full_like(token, t)], 1)[rows, best]
        done_real = torch.cat([done_real, ended], 1)[rows, best]
        full |= done_real.all(1, keepdim=True) & (stop == "true")
        if t == max_len or full.all():
            break
        alive = top + ends * -1e9
        keep = alive.topk(k, dim=1).indices
        running, run_scores = cands[rows, keep], alive[rows, keep]
        model.reorder_cache(cache, (rows * k + beam[rows, keep]).view(-1))
        # transformers' heuristic: the best running beam, scored at its current length (at max_len for "never" with a
        # positive penalty), against the worst set aside
        worst = torch.where(done_real, done_scores.min(1, keepdim=True).values, -1e9)
        length = max_len if stop == "never" and length_penalty > 0 else t
        improvable &= (run_scores[:, :1] / length ** length_penalty > worst).any(1, keepdim=True)
        if not improvable.any():
            break
    return done[..., :1 + int(done_lens.max())], done_sums


def processed(scores: torch.Tensor, seen: torch.Tensor, repetition_penalty: float, ngram: int) -> torch.Tensor:
    """generate's repetition_penalty and no_repeat_ngram_size on next-token scores [N, V], given each row's tokens
    so far [N, L] (what generate's input_ids hold; -1: padding, never a token): the score of a token already in the
    row is multiplied by the penalty where negative, divided where positive (> 1 makes it less likely), and a token
    that would repeat an n-gram of the row is banned."""
    N, V = scores.shape
    if repetition_penalty != 1.0:
        present = torch.zeros(N, V + 1, dtype=torch.bool, device=scores.device)  # column V: padding's
        present.scatter_(1, seen.masked_fill(seen < 0, V), True)
        penalised = torch.where(scores < 0, scores * repetition_penalty, scores / repetition_penalty)
        scores = torch.where(present[:, :V], penalised, scores)
    if ngram and seen.size(1) >= ngram:  # generate bans nothing before the row holds n - 1 tokens + the new one
        grams = seen.unfold(1, ngram, 1)  # [N, L - n + 1, n]: every n-gram of the row
        tail = seen[:, seen.size(1) - ngram + 1:]  # the last n - 1 tokens, which the next one would extend
        repeat = (grams[..., :-1] == tail[:, None]).all(-1) & (grams >= 0).all(-1) & (tail >= 0).all(-1, True)
        ban = torch.zeros(N, V + 1, dtype=torch.bool, device=scores.device)
        ban.scatter_(1, torch.where(repeat, grams[..., -1], V), True)
        scores = scores.masked_fill(ban[:, :V], float("-inf"))
    return scores


def search_options(g) -> dict:
    """beam_search's keyword arguments from a GenerationConfig (the run's search: rollouts, validation, caption)."""
    return {k: getattr(g, k) for k in SEARCH_OPTIONS}


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


def exported_search(generation_config, captioner, g):
    """A copy of a transformers GenerationConfig that searches as beam_search does with `g` (validation's and
    caption's search): k beams, max_len new tokens, the length penalty, early stopping, repetition penalty and
    n-gram ban, the tokens our search never proposes, and the one EOS it stops at. An exported Hugging Face folder
    holds it, so that `generate(**inputs)` on the folder gives the captions dico_scale.caption prints."""
    tok, out = captioner.tokenizer, copy.deepcopy(generation_config)
    banned = captioner.banned_tokens(tok.bos, tok.eos, tok.pad)
    options = search_options(g)
    options["early_stopping"] = {"false": False, "true": True}.get(g.early_stopping, g.early_stopping)
    out.update(num_beams=g.candidates, max_new_tokens=g.max_len, **options, do_sample=False,
               bad_words_ids=[[t] for t in banned] or None, eos_token_id=tok.eos, pad_token_id=tok.pad,
               num_return_sequences=1)
    out._from_model_config = False  # ours, not one transformers may rebuild from the model config
    return out
