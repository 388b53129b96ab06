"""Captioning a split and scoring it: CIDEr (pycocoevalcap, PTB tokenizer) and the evaluator's score.

Used by in-loop validation and by the demo's final table; predictions are gathered from all ranks onto rank 0 and
de-duplicated by key, so each image counts once however the shards were split.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .models.generation import beam_search


@torch.no_grad()
def generate(captioner, tokenizer, pixels: torch.Tensor, beam_size: int, max_len: int) -> list[str]:
    """The best beam's caption for each image; the caller chooses the mode (eval for inference)."""
    memory = captioner.encode(captioner.encode_image(pixels))
    tokens, _ = beam_search(captioner, memory, beam_size, max_len, tokenizer.bos, tokenizer.eos, tokenizer.pad)
    return tokenizer.decode_batch(tokens[:, 0])


@torch.no_grad()
def caption_split(captioner, tokenizer, loader, beam_size: int, max_len: int, device, dtype,
                  evaluator=None, max_images: int = 0) -> list[dict]:
    """Best beam per image, with the evaluator's score when an evaluator is given. Runs locally (no collectives)."""
    was_training = captioner.training
    captioner.eval()
    records = []
    for batch in loader:
        captions = generate(captioner, tokenizer, batch["pixels"].to(device, dtype), beam_size, max_len)
        scores = [None] * len(captions)
        if evaluator is not None:
            eval_pixels = batch.get("eval_pixels", batch["pixels"]).to(device)
            scores = evaluator.score(evaluator.image_features(eval_pixels), captions).tolist()
        records += [{"key": k, "caption": c, "refs": r, "score": s}
                    for k, c, r, s in zip(batch["keys"], captions, batch["refs"], scores)]
        if max_images and len(records) >= max_images:
            break
    captioner.train(was_training)
    return records[:max_images] if max_images else records


def gather_records(records: list[dict]) -> list[dict]:
    """All ranks' records on every rank, one per key, in key order."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    return sorted({r["key"]: r for r in records}.values(), key=lambda r: r["key"])


def cider(records: list[dict]) -> float:
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not records:
        return float("nan")
    tok = PTBTokenizer()
    gts = tok.tokenize({r["key"]: [{"caption": c} for c in r["refs"]] for r in records})
    res = tok.tokenize({r["key"]: [{"caption": r["caption"] or "empty"}] for r in records})
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def caption_metrics(records: list[dict]) -> dict[str, float]:
    metrics = {"cider": cider(records), "images": float(len(records))}
    scores = [r["score"] for r in records if r["score"] is not None]
    if scores:
        metrics["evaluator_score"] = sum(scores) / len(scores)
    return metrics
