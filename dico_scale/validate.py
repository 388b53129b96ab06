"""Captioning a split: the one path of in-loop validation (the captioner stages' `validate`), `dico_scale.evaluate`
and the held-out tables of the demo and compare (`heldout`).

Every rank captions its share (`caption_split`: best beam, plus each evaluator's image feature); the records are
gathered onto every rank and de-duplicated by key (`gather_records`), so each image counts once however the shards
were split; rank 0 then scores the whole split with the metric functions of `dico_scale.metrics`: CIDEr
(`metrics.cider`, the CIDEr of `metrics.coco_scores`) and the evaluator score (`evaluator_scores`, the mean of
`metrics.clip_score` over images with `metrics.mean`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .config import GenerationConfig
from .data.pipeline import Collate, eval_loader
from .data.splits import data_shards
from .metrics import caption_stats, cider, clip_score, mean, text_features
from .models import build_captioner
from .models.clip import register_model_configs
from .models.clip_scorer import ClipScorer, distinct_preprocess
from .models.generation import beam_search, search_options

__all__ = ["generate", "caption_split", "gather_records", "evaluator_scores", "score_records", "cider",
           "caption_metrics", "heldout"]


@torch.no_grad()
def generate(captioner, tokenizer, pixels: torch.Tensor, g: GenerationConfig) -> list[str]:
    """The best beam's caption for each image (g.candidates beams, g.max_len tokens, and g's search options:
    generation.search_options); the caller chooses the mode (eval for inference)."""
    memory = captioner.image_context(captioner.visual_tokens(pixels))
    tokens, _ = beam_search(captioner, memory, g.candidates, g.max_len, tokenizer.bos, tokenizer.eos, tokenizer.pad,
                            **search_options(g))
    return tokenizer.decode_batch(tokens[:, 0])


def _eval_pixels(batch: dict, name: str) -> torch.Tensor:
    """An evaluator's pixels: its own entry of evaluate's dict, the training Collate's single tensor (when the
    evaluator's transform differs from the captioner's), else the captioner's pixels."""
    p = batch.get("eval_pixels")
    if isinstance(p, dict):
        p = p.get(name)
    return batch["pixels"] if p is None else p


@torch.no_grad()
def caption_split(captioner, tokenizer, loader, g: GenerationConfig, device, evaluators: dict | None = None,
                  max_images: int = 0) -> list[dict]:
    """This rank's records {key, caption, refs, feats: {name: normalised fp32 image feature (CPU)}}, one per image,
    the best beam of each (by `generate`) in eval mode (the captioner's mode is restored). Pixels are cast to the
    captioner's dtype.
    `max_images` > 0 stops after that many images. Runs locally (no collectives)."""
    evaluators = evaluators or {}
    dtype = next(captioner.parameters()).dtype
    was_training = captioner.training
    captioner.eval()
    records = []
    try:
        for batch in loader:
            captions = generate(captioner, tokenizer, batch["pixels"].to(device, dtype), g)
            feats = {n: ev.image_features(_eval_pixels(batch, n).to(device)).cpu() for n, ev in evaluators.items()}
            for i, (key, caption, refs) in enumerate(zip(batch["keys"], captions, batch["refs"])):
                # clone: a row view would pickle the whole batch's storage into the gather
                records.append({"key": key, "caption": caption, "refs": refs,
                                "feats": {n: f[i].clone() for n, f in feats.items()}})
            if max_images and len(records) >= max_images:
                break
    finally:
        captioner.train(was_training)
    return records[:max_images] if max_images else records


def gather_records(records: list[dict]) -> list[dict]:
    """All ranks' records on every rank, one per key (the last seen), in key order."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    return sorted({r["key"]: r for r in records}.values(), key=lambda r: r["key"])


def evaluator_scores(records: list[dict], evaluator, name: str = "evaluator", prefix: str | None = None) -> list[float]:
    """Per record: evaluator.weight * max(cos(image, caption), 0) with the image feature `feats[name]` and the
    caption encoded once per distinct text over the whole split (metrics.text_features), with the evaluator's own
    caption prefix (or `prefix`). The in-loop evaluator score is their mean."""
    if not records:
        return []
    image = torch.stack([r["feats"][name] for r in records])
    text = text_features(evaluator, [r["caption"] for r in records], prefix=prefix)
    return clip_score(image, text, evaluator.weight).tolist()


# what caption_metrics logs of every split (val/<name>), then evaluator_score where the stage has an evaluator
CAPTION_STATS = ("mean_length", "vocab_size", "repetition")  # of metrics.caption_stats
CAPTION_METRICS = ("cider", "images", *CAPTION_STATS)


def caption_metrics(records: list[dict]) -> dict[str, float]:
    """{cider, images, mean_length, vocab_size, repetition (metrics.caption_stats), evaluator_score (mean of the
    records' "score"; absent when none has one)}: the in-loop validation metrics (logged as val/<name>)."""
    stats = caption_stats([r["caption"] for r in records], ngrams=())
    metrics = {"cider": cider(records), "images": float(len(records)),
               **{k: float(stats[k]) for k in CAPTION_STATS}}
    scores = [r["score"] for r in records if r.get("score") is not None]
    if scores:
        metrics["evaluator_score"] = mean(scores)
    return metrics


def score_records(records: list[dict], evaluator=None) -> list[dict]:
    """The records without image features, each with its "score" (evaluator_scores under the evaluator's name
    "evaluator"; None without an evaluator): what caption_metrics reads and the val_captions.json artifact."""
    scores = evaluator_scores(records, evaluator) if evaluator is not None else [None] * len(records)
    return [{**{k: v for k, v in r.items() if k != "feats"}, "score": s} for r, s in zip(records, scores)]


def heldout(cfg, models: dict[str, str], split: str = "test", examples: int = 3, batch_size: int = 25) -> dict:
    """{label: {"metrics": the in-loop validation metrics (caption_metrics), "examples": the first records}} of
    each captioner file in `models` on a split of cfg's data, scored by cfg's evaluator (one process, no DeepSpeed
    needed): the demo's and compare's tables. Every model is built as cfg.captioner describes it; a file '' keeps
    the weights it is built with (captioner.hf_path's folder). On the device cfg's runs train on (train.device: the
    first GPU where it is not the CPU), one captioner at a time."""
    from .engine import uses_cpu

    device = torch.device("cpu" if uses_cpu(cfg) else "cuda")
    register_model_configs(cfg.clip_model_configs)
    shards = data_shards(cfg)
    evaluator = ClipScorer(cfg.evaluator).to(device)
    results = {}
    for label, path in models.items():
        captioner = build_captioner(cfg, path).to(device)
        tok = captioner.tokenizer
        collate = Collate(captioner.preprocess, distinct_preprocess(evaluator, captioner.preprocess), tok,
                          cfg.data.max_caption_tokens, seed=0)
        loader = eval_loader(shards[split], collate, batch_size)
        records = caption_split(captioner, tok, loader, cfg.generation, device, {"evaluator": evaluator})
        del captioner  # before the next one is built
        records = score_records(records, evaluator)  # as in-loop validation scores
        results[label] = {"metrics": caption_metrics(records), "examples": records[:examples]}
    return results
