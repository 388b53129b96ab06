"""What dico_scale.evaluate reads: a split's shards (a split of the run's config, or a webdataset spec given as is),
its images through the captioner's and every evaluator's transforms, the training split's captions (for the novelty
statistic), and the data counts of all ranks, reported as training reports them."""
from __future__ import annotations

import os
import re

from dico_scale.errors import ConfigError

SPLITS = ("train", "val", "test")


def shards_arg(shards: str, split: str) -> str:
    """--shards as given, else the config's split that --split names, else test. A split of the config labelled as
    another (`--shards test --split val`) would put one split's numbers under the other's name."""
    if not shards:
        return split if split in SPLITS else "test"
    if shards in SPLITS and split in SPLITS and split != shards:
        raise ConfigError(f"--split {split} would label the {shards} split's results as {split}: pass --shards "
                          f"{split}, or drop --split")
    return shards


def resolve_shards(arg: str, cfg, required: bool = True) -> tuple[str, str]:
    """(webdataset spec, split label) of a split name of the config or of a spec given as is."""
    if arg not in SPLITS:
        return arg, split_label(arg)
    from dico_scale.data.splits import data_shards

    spec = data_shards(cfg).get(arg, "")
    if not spec and required:
        raise ConfigError(f"the checkpoint's config has no {arg} shards (data.{arg}_shards is empty); "
                          f"pass --shards SPEC")
    return spec, arg


def split_label(spec: str) -> str:
    """'/data/coco/val-{00000..00004}.tar' -> 'val'."""
    name = re.sub(r"\.tar$", "", os.path.basename(spec.split("::")[0]))
    return re.sub(r"[-_.]*(\{[^}]*\}|\d+)$", "", name) or "custom"


def check_shards(spec: str, option: str) -> list[str]:
    import webdataset as wds

    from dico_scale.data.pipeline import folder_problem, glob_hint, is_local

    try:
        urls = wds.shardlists.expand_urls(spec)
    except Exception as e:
        raise ConfigError(f"bad shard spec '{spec}' ({option}): {type(e).__name__}: {e}") from None
    if problem := folder_problem(urls):
        raise ConfigError(f"bad shard spec '{spec}' ({option}): {problem}")
    local = [u for u in urls if is_local(u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        raise ConfigError(f"bad shard spec '{spec}' ({option}): {len(missing)} of {len(urls)} shards not found, "
                          f"e.g. '{missing[0]}'{glob_hint(missing)}")
    return urls


class EvalCollate:
    """Captioner pixels plus each evaluator's own pixels (their transforms may differ); equal transforms run once.
    Images go through the transforms as the training Collate's (`pipeline.Collate`: prepared per sample, then
    batched)."""

    def __init__(self, preprocess, eval_preprocess: dict):
        self.transforms = {repr(t): t for t in (preprocess, *eval_preprocess.values())}
        self.preprocess, self.eval_preprocess = repr(preprocess), {n: repr(t) for n, t in eval_preprocess.items()}

    def prepare(self, image) -> dict:
        from dico_scale.data.pipeline import transformed

        return {name: transformed(t, image) for name, t in self.transforms.items()}

    def __call__(self, samples):
        from dico_scale.data.pipeline import stacked

        prepared, refs, keys = zip(*samples)
        done = {name: stacked(t, [p[name] for p in prepared]) for name, t in self.transforms.items()}
        return {"pixels": done[self.preprocess], "refs": list(refs), "keys": list(keys),
                "eval_pixels": {n: done[t] for n, t in self.eval_preprocess.items()}}


def training_captions(spec: str, rank: int, world: int):
    """(normalised reference captions of the training shards, this rank's data counts): each rank reads its share of
    the shards, all get the union; faulty samples are counted (data_report) and skipped as the loaders do."""
    import torch.distributed as dist
    import webdataset as wds

    from dico_scale.data.pipeline import Tally, shard_captions
    from dico_scale.metrics import normalise

    seen, tally = set(), Tally()
    for refs in shard_captions(wds.shardlists.expand_urls(spec)[rank::world], tally):
        seen.update(normalise(r) for r in refs)
    if dist.is_initialized() and world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, seen)
        seen = set().union(*parts)
    return seen, tally


def counted(loader, totals):
    """The loader's batches, each one's data_stats (the pipeline's own fault counts, pipeline.Tally: what its reader
    read and skipped) added to the Counter `totals`, as the training loop adds them (loop.DataCounts)."""
    for batch in loader:
        totals.update(batch.get("data_stats", {}))
        yield batch


def data_report(totals) -> tuple[dict, str, dict]:
    """(the JSON's "data" entry, the summary line, the MLflow metrics) of all ranks' counts (a collective): samples
    read, skipped, and the faults by kind, as training reports them; evaluate enforces no data.max_skipped_share."""
    from collections import Counter

    import torch.distributed as dist

    from dico_scale.data.pipeline import KINDS
    from dico_scale.loop import data_metrics, data_summary, skipped_share

    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, dict(totals))
        totals = sum((Counter(p) for p in parts), Counter())
    entry = {"read": totals["read"], "skipped": totals["skipped"], "skipped_share": skipped_share(totals),
             "faults": {k: totals[k] for k in KINDS if totals[k]}}
    tracked = {"data/read": totals["read"], "data/skipped": totals["skipped"], **data_metrics(totals)}  # training's
    return entry, data_summary(totals, 1.0, 0)[0], tracked  # bound 1.0: the counts line alone, not its warning
