"""Loader throughput: our WebDataset pipeline (train_loader + Collate) against a plain torch DataLoader reading the
same JPEG files from a folder, with the same open_clip preprocessing, tokenizer and collate, for several worker counts.

    python benchmarks/data.py --json runs/bench/data.json

It first generates the dataset (textured 640x480 JPEGs of about COCO's file size, 5 captions each) as a folder and,
through the shard writer, as shards; a second run with the same options reuses both. Every epoch restarts the
workers in both loaders (neither keeps them alive), and the first --warmup epochs are not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import open_clip
import torch
from PIL import Image, ImageDraw

from dico_scale.data import write_shards
from dico_scale.data.pipeline import Collate, train_loader
from dico_scale.data.tokenizer import CaptionTokenizer

WORDS = "a man woman dog cat sits stands on near the table street grass with red blue small large next to".split()


def make_image(seed: int, w: int, h: int) -> Image.Image:
    """Smooth colour field + shapes + sensor-like noise: JPEG size and decode cost close to a COCO photo."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(10, max(11, w // 5)))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    pixels = np.asarray(im, dtype=np.int16) + rng.normal(0, 14, (h, w, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_dataset(root: str, n: int, w: int, h: int, samples_per_shard: int) -> tuple[list, str]:
    """Folder rows (path, captions, key) and the shard spec; reused when root holds the same dataset."""
    stamp = {"n": n, "w": w, "h": h, "samples_per_shard": samples_per_shard}
    jsonl, shards = os.path.join(root, "pairs.jsonl"), os.path.join(root, "shards")
    done = os.path.join(root, "stamp.json")
    if not (os.path.exists(done) and json.load(open(done)) == stamp):
        os.makedirs(os.path.join(root, "images"), exist_ok=True)
        rng = np.random.default_rng(0)
        with open(jsonl, "w") as f:
            for i in range(n):
                make_image(i, w, h).save(os.path.join(root, "images", f"{i:06d}.jpg"), "JPEG", quality=90)
                caps = [" ".join(rng.choice(WORDS, 10)) for _ in range(5)]
                f.write(json.dumps({"image": f"images/{i:06d}.jpg", "captions": caps}) + "\n")
        rc = write_shards.main(["jsonl", "--input", jsonl, "--out", shards, "--overwrite", "--no-progress",
                                "--samples-per-shard", str(samples_per_shard), "--workers", str(os.cpu_count())])
        assert rc == 0, "shard writer failed"
        json.dump(stamp, open(done, "w"))
    manifest = json.load(open(os.path.join(shards, "manifest.json")))
    rows = [json.loads(line) for line in open(jsonl)]
    folder = [(os.path.join(root, r["image"]), r["captions"], os.path.basename(r["image"])[:-4]) for r in rows]
    return folder, os.path.join(shards, manifest["splits"]["train"]["spec"])


class FolderDataset(torch.utils.data.Dataset):
    """The baseline: one file per image, captions held in memory; yields what the pipeline's decoder yields (the
    image through the collate's transforms: `prepare`)."""

    def __init__(self, rows, prepare):
        self.rows, self.prepare = rows, prepare

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        path, captions, key = self.rows[i]
        with Image.open(path) as im:
            return self.prepare(im.convert("RGB")), captions, key


def samples_per_s(loader, epochs: int, warmup: int) -> float:
    for _ in range(warmup):
        for _ in loader:
            pass
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            n += len(batch["keys"])
    return n / (time.perf_counter() - t0)


def run(a) -> dict:
    size = open_clip.get_model_config(a.model)["vision_cfg"]["image_size"]
    preprocess = open_clip.image_transform(size, is_train=False)  # the model's eval transform
    collate = Collate(preprocess, None, CaptionTokenizer(), 24, seed=0)
    rows, spec = make_dataset(a.dir, a.images, a.width, a.height, a.samples_per_shard)
    results = []
    for w in a.workers:
        pipe, _ = train_loader(spec, collate, a.batch_size, len(rows), 1, w, a.shuffle_buffer, 0)
        folder = torch.utils.data.DataLoader(FolderDataset(rows, collate.prepare), batch_size=a.batch_size, shuffle=True,
                                             drop_last=True, num_workers=w, collate_fn=collate)
        p, f = samples_per_s(pipe, a.epochs, a.warmup), samples_per_s(folder, a.epochs, a.warmup)
        results.append({"workers": w, "pipeline_samples_per_s": round(p, 1), "folder_samples_per_s": round(f, 1),
                        "ratio": round(p / f, 3)})
        print(f"workers={w}: pipeline {p:.1f}/s, folder {f:.1f}/s", file=sys.stderr, flush=True)
    return {"config": {**vars(a), "image_size": size, "shards": spec}, "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "results": results}


def table(report: dict) -> str:
    c = report["config"]
    lines = [f"{c['images']} images {c['width']}x{c['height']} JPEG -> {c['model']} preprocess ({c['image_size']} px), "
             f"batch {c['batch_size']}, {c['epochs']} timed epochs after {c['warmup']} warm-up, {report['cpus']} CPUs",
             "", "| workers | pipeline samples/s | folder samples/s | ratio |", "|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['workers']} | {r['pipeline_samples_per_s']:.1f} | {r['folder_samples_per_s']:.1f} "
                     f"| {r['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="data/bench_loader", help="where the generated folder and shards go")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--samples-per-shard", type=int, default=100)
    p.add_argument("--model", default="ViT-B-32", help="open_clip model whose eval preprocessing is applied")
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loader and worker count")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs first (page cache, imports)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    report = run(a)
    print(table(report))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        json.dump(report, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
