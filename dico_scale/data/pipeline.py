"""Streaming image-caption batches from WebDataset tar shards.

A sample on disk is `<key>.jpg` + `<key>.json` (a list of reference captions). A batch is a dict:
  pixels [B, 3, H, W] (captioner preprocessing), eval_pixels (evaluator preprocessing, only when it differs),
  refs (list of caption lists), keys, captions (one reference per image) and their tokens [B, L] (with a pad token),
  data_stats: what the reader that built the batch read and skipped since its previous batch (see `Tally`).

Training streams resample shards from one seeded sequence that every rank and worker draws alike, then split it by
node and by worker, so ranks read different shards and every rank yields exactly the same number of batches per epoch.
Evaluation reads each shard once, split by node and worker, never dropping or repeating a sample.
Bad data never stops a loader: each bad sample or shard read is logged (one warning line), counted by kind, skipped.
Only a dead stream raises DataError: 100 shards in a row without a file, or, in a training reader, without a usable
sample (a training stream resamples its shards forever; an evaluation pass ends by itself).
The counts ride in the batches; a reader's faults after its last batch are logged but not counted (this only
happens at the end of an evaluation pass: training streams never end).
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import random
import signal
from collections import Counter

import torch
import webdataset as wds

from ..errors import ConfigError, DataError
from .images import ImageTooLarge, for_eval, open_image, to_rgb
from .tokenizer import CaptionTokenizer

log = logging.getLogger(__name__)

KINDS = ("corrupt_image", "image_too_large", "refused_image", "bad_json", "empty_captions", "truncated_tar",
         "missing_shard", "other")
MAX_EMPTY_SHARDS = 100  # shards in a row without a single file: the stream is dead, not unlucky
# Shards (and at least as many samples) in a row without a usable sample, in one training reader: dead as well.
# Counted in shards, not samples: one bad shard of 10,000 samples is a rare run in a good dataset. Shards are drawn at
# random, so where a share q of them is wholly bad, a run of 100 starts with probability q**100 (2e-10 at q = 0.8).
MAX_DRY_SHARDS = 100
SPEC_FORMS = "a spec is a tar file, a brace pattern like train-{00000..00009}.tar, or such specs joined by '::'"

class Tally(Counter):
    """Reads and faults of one loader in one reader (process or DataLoader worker) since its last batch.
    Each loader owns its tally, so a training and an evaluation loader iterated in one process (num_workers=0) never
    pass counts to each other. "read": samples read (good or bad) + shards that failed at read time; "skipped": those
    dropped; per kind: faults."""

    def fault(self, kind: str, where: str, why=None, shard: bool = False) -> None:
        """Counts one fault and logs it on one line; a failed shard also counts as one unit read."""
        self[kind] += 1
        self["skipped"] += 1
        if shard:
            self["read"] += 1
        log_fault(kind, where, why)

    def take(self) -> dict[str, int]:
        out = dict(self)
        self.clear()
        return out


class Dry:
    """A training reader's run without a usable sample: the shards it finished reading (_read_shards) and the faulty
    samples it decoded (_decode) since its last usable one. The run must span MAX_DRY_SHARDS samples too: the shuffle
    buffer's first fill may read 100 one-sample shards before any sample is decoded."""

    def __init__(self):
        self.shards = self.samples = 0

    def sample(self, usable: bool, url) -> None:
        if usable:
            self.shards = self.samples = 0
            return
        self.samples += 1
        if min(self.shards, self.samples) >= MAX_DRY_SHARDS:
            raise DataError(f"no usable sample in the last {self.shards} shards read ({self.samples} samples in a "
                            f"row skipped; last: {url})")


def one_line(e: DataError) -> str:
    """The message, also when a DataLoader worker raised it (torch re-raises it with the worker's traceback)."""
    return str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]


def log_fault(kind: str, where: str, why=None) -> None:
    why = (str(why) or type(why).__name__).splitlines()[0][:200] if isinstance(why, Exception) else why
    log.warning("data fault %s: %s%s", kind, where, f" ({why})" if why else "")


class Collate:
    """Turns decoded samples into one batch; picks the reference caption used for teacher forcing.

    A loader's collate has two steps: `prepare(image)`, each image through the transforms, run per sample while
    decoding (an image a transform refuses, such as one past a processor's aspect-ratio limit, is a `refused_image`
    fault and skipped, never a failed batch), then the call, on (prepared, refs, key) samples, which batches them."""

    def __init__(self, preprocess, eval_preprocess, tokenizer: CaptionTokenizer, max_tokens: int, seed: int):
        self.preprocess, self.eval_preprocess = preprocess, eval_preprocess
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.rng = random.Random(seed)

    def prepare(self, image):
        eval_pixels = None if self.eval_preprocess is None else transformed(self.eval_preprocess, image)
        return transformed(self.preprocess, image), eval_pixels

    def __call__(self, samples):
        prepared, refs, keys = zip(*samples)
        pixels, eval_pixels = zip(*prepared)
        batch = {"pixels": stacked(self.preprocess, pixels), "refs": list(refs), "keys": list(keys)}
        if self.eval_preprocess is not None:
            batch["eval_pixels"] = stacked(self.eval_preprocess, eval_pixels)
        batch["captions"] = [self.rng.choice(r) for r in refs]
        batch["tokens"] = self.tokenizer.batch(batch["captions"], self.max_tokens)
        return batch


class _Batch:
    """The collation step of one loader: the batch carries its reader's counts since the previous batch."""

    def __init__(self, collate, tally: Tally):
        self.collate, self.tally = collate, tally

    def __call__(self, samples):
        batch = self.collate(samples)
        batch["data_stats"] = self.tally.take()  # runs in the reader (worker) that built the batch
        return batch


def transformed(transform, image):
    """One image through a transform. Evaluation images keep their own mode (see _decode); open_clip's and the
    official transforms convert to RGB themselves, after the crop. A transform without that step gets the image
    through to_rgb first. A vision-language model's processor (a transform with `collate`) gives its own outputs."""
    x = transform(image)
    if not hasattr(transform, "collate") and image.mode != "RGB" and x.shape[-3] != 3:
        x = transform(to_rgb(image))
    return x


def stacked(transform, pixels):
    """Transformed images as one batch (a processor pads and batches its own outputs)."""
    return transform.collate(list(pixels)) if hasattr(transform, "collate") else torch.stack(pixels)


# ---- reading -----------------------------------------------------------------------------------------------------

def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def folder_problem(urls: list[str]) -> str | None:
    """A local folder named as a shard: it passes an existence check, then fails every read ('Is a directory')."""
    if folder := next((u for u in urls if is_local(u) and os.path.isdir(u)), None):
        return f"'{folder}' is a folder, not a shard ({SPEC_FORMS})"
    return None


def glob_hint(missing: list[str]) -> str:
    """webdataset expands braces, not globs: `train-*.tar` names one file called that."""
    if any(c in u for u in missing for c in "*?"):
        return " (globs are not expanded: name the shards with a brace pattern like train-{00000..00009}.tar)"
    return ""


def check_local_shards(spec: str, key: str = "shards", log_missing: bool = True) -> tuple[list[str], list[str]]:
    """(shards to read, local shards missing) of a spec (brace patterns, `::`-joined sources).
    URLs and pipe: commands are not checked here: their failures are counted when they are read."""
    bad = f"bad value for config key '{key}'"
    try:
        urls = wds.shardlists.expand_urls(spec)
    except ValueError:  # braceexpand.UnbalancedBracesError
        raise ConfigError(f"{bad}: unbalanced braces in '{spec}' ({SPEC_FORMS})") from None
    if problem := folder_problem(urls):
        raise ConfigError(f"{bad}: {problem}")
    missing = [u for u in urls if is_local(u) and not os.path.exists(u)]
    if len(missing) == len(urls):
        raise ConfigError(f"{bad}: no shard of '{spec}' exists{glob_hint(missing)}")
    for u in missing if log_missing else ():
        log.warning("data fault missing_shard: %s (dropped from the shard list)%s", u, glob_hint([u]))
    gone = set(missing)
    return [u for u in urls if u not in gone], missing


def _read_shards(src, tally: Tally, shared: bool = False, dry: Dry | None = None):
    """{url} dicts -> tar members; a shard that cannot be opened or read to its end is one fault, never a crash.
    A shard failing before its first member counts as missing (a failed `pipe:` or URL), after it as truncated.
    shared: every reader reads every shard (sample split), so only the first reader counts shard faults.
    dry: a training reader's run without a usable sample, which counts the shards read here."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    counts = not shared or rank == worker == 0
    empty_in_a_row = 0
    for shard in src:
        url, files, error = shard["url"], 0, None
        try:
            stream = wds.gopen(url)
        except Exception as e:
            stream, error = None, e
        if stream is not None:
            try:
                for member in wds.tariterators.tar_file_iterator(stream):  # the default handler re-raises
                    files += 1
                    member["__url__"] = url
                    yield member
            except Exception as e:
                error = e
            try:
                stream.close()  # a pipe: command's exit status is checked here
            except Exception as e:
                error = error or e
        if error is not None and counts:
            tally.fault("truncated_tar" if files else "missing_shard", url, error, shard=True)
        empty_in_a_row = 0 if files else empty_in_a_row + 1
        if dry is not None:
            dry.shards += 1
        if empty_in_a_row >= MAX_EMPTY_SHARDS:
            raise DataError(f"no data in the last {MAX_EMPTY_SHARDS} shards read (last: {url})")
        yield {}  # end of shard: group_by_keys never joins samples across shards


def _group(src, tally: Tally):
    def skip(exn):
        tally.fault("other", type(exn).__name__, exn)
        return True
    return wds.tariterators.group_by_keys(src, handler=skip)


def sample_refs(s: dict, tally: Tally, where: str) -> list[str] | None:
    """A sample's reference captions (its .json: a list of non-blank strings), or None once its fault is counted."""
    try:
        refs = json.loads(s["json"])
    except (KeyError, ValueError) as e:
        tally.fault("bad_json", where, "no .json" if isinstance(e, KeyError) else e)
        return None
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        tally.fault("bad_json", where, "not a list of caption strings")
        return None
    if not refs or not all(r.strip() for r in refs):
        tally.fault("empty_captions", where, "empty caption list" if not refs else "a blank caption")
        return None
    return refs


def shard_captions(urls: list[str], tally: Tally):
    """The reference captions of every good sample of the shards, images left unread (evaluate's novelty scan of the
    training split); read and faulty samples counted in `tally` as the loaders count them."""
    for s in _group(_read_shards(({"url": u} for u in urls), tally), tally):
        tally["read"] += 1
        if (refs := sample_refs(s, tally, f"{s['__key__']} in {s.get('__url__')}")) is not None:
            yield refs


def _decode(src, tally: Tally, prepare, evaluation: bool = False, dry: Dry | None = None):
    """Samples -> (prepare(image), captions, key); a bad one is counted under its kind and skipped.

    Training images go through to_rgb. Evaluation images keep their own mode (for_eval), so that the transform
    resizes and crops first and converts to RGB last, as the official CLIP-S / PAC-S tools do.
    dry: a training reader's run without a usable sample (an evaluation pass ends by itself)."""
    for s in src:
        tally["read"] += 1
        out = _decode_one(s, tally, prepare, evaluation)
        if dry is not None:
            dry.sample(out is not None, s.get("__url__"))
        if out is not None:
            yield out


def _decode_one(s: dict, tally: Tally, prepare, evaluation: bool):
    """One sample's (prepare(image), captions, key), or None once its fault is counted."""
    key = s["__key__"]
    where = f"{key} in {s.get('__url__')}"
    if (refs := sample_refs(s, tally, where)) is None:
        return None
    try:
        im = open_image(s["jpg"])  # decodes the whole file: a truncated JPEG fails here
        image = for_eval(im) if evaluation else to_rgb(im)
    except ImageTooLarge as e:
        tally.fault("image_too_large", where, e)
        return None
    except Exception as e:
        tally.fault("corrupt_image", where, "no .jpg" if isinstance(e, KeyError) else e)
        return None
    try:
        prepared = prepare(image)
    except Exception as e:
        tally.fault("refused_image", where, f"{type(e).__name__}: {e}")
        return None
    return prepared, refs, key


def _reader_shuffle(bufsize: int, seed: int):
    """Sample shuffle buffer seeded per (seed, rank, worker) when iterated: no two readers shuffle alike."""
    def stage(src):
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{seed}/{rank}/{worker}")  # a str seed is hashed with sha512: same in every process
        return wds.shuffle(bufsize, initial=min(bufsize, 100), rng=rng)(src)
    return stage


def _shared_seed() -> int:
    return 0


def _worker_share(batches: int):
    """Each reader stops after its share of the epoch's batches (the DataLoader takes them round-robin), so no
    worker decodes batches that the epoch's end would throw away."""
    def stage(src):
        _, _, worker, workers = wds.utils.pytorch_worker_info()
        yield from itertools.islice(src, batches // workers + (worker < batches % workers))
    return stage


def _ignore_ctrl_c(worker_id: int) -> None:
    """A worker hit by the terminal's Ctrl-C would exit quietly and fail the batch the trainer is stopping after;
    the trainer alone decides (supervision.StopFlag)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _urls(spec) -> list[str]:
    return list(spec) if isinstance(spec, (list, tuple)) else wds.shardlists.expand_urls(spec)


def train_loader(spec, collate: Collate, batch_size: int, samples_per_epoch: int, world_size: int,
                 num_workers: int, shuffle_buffer: int, seed: int, start_batch: int = 0):
    """An epoch of samples_per_epoch // (world_size * batch_size) batches per rank; returns (loader, batches).

    start_batch > 0 resumes inside an epoch: only the remaining batches, from a fresh shard and sample order
    (seed mixed with start_batch), never a replay of the epoch's first batches. spec: a webdataset spec or a list.
    """
    batches = max(1, samples_per_epoch // (world_size * batch_size)) - start_batch
    if batches <= 0:
        return [], 0
    if start_batch:
        seed = (seed * 1_000_003 + start_batch) % 2**62
    tally, dry = Tally(), Dry()  # per reader: each worker gets its own copies
    stages = [
        # One shard sequence shared by all ranks and workers (worker_seed constant), then partitioned.
        wds.ResampledShards(_urls(spec), seed=seed, worker_seed=_shared_seed, deterministic=True),
        wds.split_by_node,
        wds.split_by_worker,
        functools.partial(_read_shards, tally=tally, dry=dry), functools.partial(_group, tally=tally),
        _reader_shuffle(shuffle_buffer, seed),
        functools.partial(_decode, tally=tally, prepare=collate.prepare, dry=dry),
        wds.batched(batch_size, collation_fn=_Batch(collate, tally), partial=False),
        _worker_share(batches),
    ]
    loader = wds.WebLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=num_workers,
                           worker_init_fn=_ignore_ctrl_c)
    return loader.with_epoch(batches), batches


def _split_samples(src):
    """Sample-level split for splits with fewer shards than readers: every reader reads all, keeps its share."""
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    yield from itertools.islice(src, rank * workers + worker, None, world * workers)


def eval_loader(spec, collate: Collate, batch_size: int, num_workers: int = 0):
    """Every sample of the split exactly once across all ranks and workers.

    Shards are split by node and worker when there are enough of them; otherwise samples are.
    """
    urls = _urls(spec)
    world = wds.utils.pytorch_worker_info()[1]  # as split_by_node sees it: RANK/WORLD_SIZE first, then the group
    readers, tally = world * max(1, num_workers), Tally()
    group = functools.partial(_group, tally=tally)
    if len(urls) >= readers:
        stages = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker,
                  functools.partial(_read_shards, tally=tally), group]
    else:
        stages = [wds.SimpleShardList(urls), functools.partial(_read_shards, tally=tally, shared=True), group,
                  _split_samples]
    stages.append(functools.partial(_decode, tally=tally, prepare=collate.prepare, evaluation=True))
    stages.append(wds.batched(batch_size, collation_fn=_Batch(collate, tally), partial=True))
    return wds.WebLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=num_workers,
                           worker_init_fn=_ignore_ctrl_c)
