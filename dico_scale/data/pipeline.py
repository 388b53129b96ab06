"""Streaming image-caption batches from WebDataset tar shards.

A sample on disk is `<key>.jpg` + `<key>.json` (a list of reference captions). A batch is a dict:
  pixels [B, 3, H, W] (captioner preprocessing), eval_pixels (evaluator preprocessing, only when it differs),
  refs (list of caption lists), keys, captions (one reference per image) and their tokens [B, L] (with a pad token).

Training streams resample shards from one seeded sequence that every rank and worker draws alike, then split it by
node and by worker, so ranks read different shards and every rank yields exactly the same number of batches per epoch.
Evaluation reads each shard once, split by node and worker, never dropping or repeating a sample.
"""
from __future__ import annotations

import itertools
import logging
import random
from collections import Counter

import torch
import torch.distributed as dist
import webdataset as wds

from .tokenizer import CaptionTokenizer

log = logging.getLogger(__name__)
faults: Counter = Counter()  # data faults seen by this process, by exception type


def skip_fault(exn: Exception) -> bool:
    """webdataset handler: count and log a bad sample or shard, then keep going."""
    faults[type(exn).__name__] += 1
    text = str(exn) or repr(exn.__cause__ or exn)  # webdataset's DecodingError has an empty message
    log.warning("skipping bad data: %s: %s", type(exn).__name__, (text.splitlines() or [""])[0][:200])
    return True


class Collate:
    """Turns decoded samples into one batch; picks the reference caption used for teacher forcing."""

    def __init__(self, preprocess, eval_preprocess, tokenizer: CaptionTokenizer, max_tokens: int, seed: int):
        self.preprocess, self.eval_preprocess = preprocess, eval_preprocess
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.rng = random.Random(seed)

    def __call__(self, samples):
        images, refs, keys = zip(*samples)
        batch = {"pixels": torch.stack([self.preprocess(im) for im in images]), "refs": list(refs), "keys": list(keys)}
        if self.eval_preprocess is not None:
            batch["eval_pixels"] = torch.stack([self.eval_preprocess(im) for im in images])
        batch["captions"] = [self.rng.choice(r) for r in refs]
        batch["tokens"] = self.tokenizer.batch(batch["captions"], self.max_tokens)
        return batch


def _valid(sample) -> bool:
    image, refs, key = sample
    ok = isinstance(refs, list) and len(refs) > 0 and all(isinstance(r, str) and r.strip() for r in refs)
    if not ok:
        skip_fault(ValueError(f"sample {key}: reference captions must be a non-empty list of strings"))
    return ok


def _shared_seed() -> int:
    return 0


def _decode_stages():
    return [
        wds.decode("pilrgb", handler=skip_fault),
        wds.to_tuple("jpg", "json", "__key__", handler=skip_fault),
        wds.select(_valid),
    ]


def train_loader(spec: str, collate: Collate, batch_size: int, samples_per_epoch: int, world_size: int,
                 num_workers: int, shuffle_buffer: int, seed: int):
    """An endless-by-epochs loader: each epoch yields samples_per_epoch // (world_size * batch_size) batches per rank."""
    batches = max(1, samples_per_epoch // (world_size * batch_size))
    stages = [
        # One shard sequence shared by all ranks and workers (worker_seed constant), then partitioned.
        wds.ResampledShards(spec, seed=seed, worker_seed=_shared_seed, deterministic=True),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=skip_fault),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=random.Random(seed)),
        *_decode_stages(),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    ]
    loader = wds.WebLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=num_workers)
    return loader.with_epoch(batches), batches


def _split_samples(src):
    """Sample-level split for splits with fewer shards than readers: every reader reads all, keeps its share."""
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    yield from itertools.islice(src, rank * workers + worker, None, world * workers)


def eval_loader(spec: str, collate: Collate, batch_size: int, num_workers: int = 0):
    """Every sample of the split exactly once across all ranks and workers.

    Shards are split by node and worker when there are enough of them; otherwise samples are.
    """
    urls = wds.shardlists.expand_urls(spec)
    readers = (dist.get_world_size() if dist.is_initialized() else 1) * max(1, num_workers)
    if len(urls) >= readers:
        stages = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker,
                  wds.tarfile_to_samples(handler=skip_fault), *_decode_stages()]
    else:
        stages = [wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=skip_fault), _split_samples,
                  *_decode_stages()]
    stages.append(wds.batched(batch_size, collation_fn=collate, partial=True))
    return wds.WebLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=num_workers)
