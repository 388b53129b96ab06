"""Write image-caption datasets as WebDataset tar shards the training pipeline reads.

    python -m dico_scale.data.write_shards karpathy --split-file dataset_coco.json --image-root /data/coco --out DIR
    python -m dico_scale.data.write_shards jsonl --input pairs.jsonl --image-root /data/imgs --out DIR

A sample is `<key>.jpg` + `<key>.json` (a list of captions). Layout "image": one sample per image with all its
captions (DiCO, evaluation); layout "caption": one sample per caption, json a one-element list (XE).
Images are stored as upright RGB (or greyscale) JPEGs at most --max-side on the longer side: plain JPEGs are copied,
anything else goes through images.to_rgb (alpha over white, EXIF rotation, 16-bit greyscale scaled) and is re-encoded.
Shards are `<split>-000000.tar, ...`; each is written under a hidden temporary name and renamed when complete.
`manifest.json`, written last, records the source, options, counts, shards with sha256, and skipped items.
One writer at a time per --out: it holds `.write_shards.lock` there, and a second one is refused.
The output depends only on the source and the options, never on --workers (results are consumed in source order).
See docs/data.md.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import io
import json
import os
import re
import shlex
import socket
import sys
from multiprocessing import Pool

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ..errors import OneLineParser
from .images import ImageTooLarge, exif_orientation, open_image, to_rgb
from .synthetic import expanding_marks
from .sources import Item, SourceError, check_unique, read_jsonl, read_karpathy, sanitize

SPLIT_ORDER = ("train", "restval", "val", "test")
SHARD_NAME = re.compile(r"[A-Za-z0-9_]+-\d{6}\.tar")
TAR_END = 1024 + 10240  # end-of-archive blocks plus the worst-case padding to tarfile's record size
MAX_SIDE = 640  # COCO's size: COCO images are copied, larger ones shrunk to it


def parse_size(text: str) -> int:
    """'1GB', '500MB', '2GiB', '123' -> bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GB, 500MB)")
    base = 1024 if m[3] else 1000
    return int(float(m[1]) * base ** " KMGT".index(m[2].upper() or " "))


def load_image(path: str, max_side: int, quality: int) -> tuple[bytes | None, str]:
    """(JPEG bytes, "") or (None, why it was skipped). A plain RGB or greyscale JPEG, upright (no EXIF rotation)
    and within max_side (0: any size), is copied as is; anything else is converted by to_rgb and re-encoded."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None, "missing image file"
    except OSError as e:
        return None, f"unreadable image: {e.strerror or e}"
    try:
        im = open_image(raw)  # a full decode: catches truncated or corrupt files, not only bad headers
        if (im.format == "JPEG" and im.mode in ("RGB", "L") and exif_orientation(im) == 1
                and (max_side == 0 or max(im.size) <= max_side)):
            return raw, ""
        im = to_rgb(im)  # CMYK, rotated, alpha, 16-bit, ...
    except ImageTooLarge as e:
        return None, str(e)
    except Exception as e:  # PIL raises many types for bad files
        return None, f"unreadable image: {type(e).__name__}: {e}"
    w, h = im.size
    if max_side and max(w, h) > max_side:
        s = max_side / max(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), ""


def _entry(n: int) -> int:  # bytes a member of n bytes takes in a tar: header + data padded to 512
    return 512 + (n + 511) // 512 * 512


class ShardSink:
    """One split's samples into <split>-NNNNNN.tar shards bounded by a sample count and a byte size."""

    def __init__(self, out: str, split: str, max_count: int, max_bytes: int):
        self.out, self.split, self.max_count, self.max_bytes = out, split, max_count, max_bytes
        self.shards, self.tar, self.file, self.count = [], None, None, 0

    def write(self, key: str, jpg: bytes, text: bytes):
        size = _entry(len(jpg)) + _entry(len(text))
        if self.tar and (self.count >= self.max_count or self.file.tell() + size + TAR_END > self.max_bytes):
            self._finish()
        if self.tar is None:
            self._open()
        self.tar.write({"__key__": key, "jpg": jpg, "json": text})
        self.count += 1

    def close(self):
        if self.tar is not None:
            self._finish()

    def _paths(self):
        name = f"{self.split}-{len(self.shards):06d}.tar"
        return name, os.path.join(self.out, name), os.path.join(self.out, f".{name}.tmp")

    def _open(self):
        self.file = open(self._paths()[2], "wb")
        # fixed owner, mode and mtime: the tar bytes depend only on the samples
        self.tar = wds.TarWriter(self.file, user="", group="", mode=0o444, encoder=False, mtime=0,
                                 format="PAX_FORMAT")
        self.count = 0

    def _finish(self):
        self.tar.close()
        self.file.close()  # TarWriter leaves a file object it was given open
        name, final, tmp = self._paths()
        self.shards.append({"name": name, "samples": self.count, "bytes": os.path.getsize(tmp),
                            "sha256": sha256(tmp)})
        os.replace(tmp, final)  # atomic: a shard under a final name is always complete
        self.tar = self.file = None


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def brace_spec(names: list[str]) -> str:
    """['train-000000.tar', ..., 'train-000012.tar'] -> 'train-{000000..000012}.tar'."""
    if len(names) <= 1:
        return names[0] if names else ""
    split = names[0].rsplit("-", 1)[0]
    return f"{split}-{{000000..{len(names) - 1:06d}}}.tar"


def select_splits(items: list[Item], wanted: str | None) -> list[str]:
    present = sorted({it.split for it in items}, key=lambda s: (SPLIT_ORDER + (s,)).index(s))
    if not wanted:
        return present
    splits = [s.strip() for s in wanted.split(",") if s.strip()]
    for s in splits:
        if s not in present:
            raise SourceError(f"unknown split {s!r}; the source has: {', '.join(present) or 'none'}")
    return splits


LOCK = ".write_shards.lock"  # in --out; names the holder. It stays: removing it would race a new holder


def _not_a_folder(out: str, e: OSError) -> str:
    """Why --out cannot be made: makedirs says 'File exists' for a file, a dangling link and a symlink loop alike."""
    if os.path.lexists(out) and not os.path.isdir(out):
        try:
            os.stat(out)
        except OSError as s:  # a symlink loop, a link to nothing
            return f"it is a symlink that leads nowhere ({s.strerror})"
        return "it is a file, not a folder"
    return e.strerror or str(e)


@contextlib.contextmanager
def writing_into(out: str):
    """--out created and held for this writer alone: a second write_shards into it at the same time mixed both
    sets' shards under one manifest whose checksums matched neither. An flock on a file in it (not on the folder:
    NFS locks a folder on one host only, and a file only where it is open for writing), released when this
    process ends, however it ends."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise SourceError(f"--out {out} cannot be created: {_not_a_folder(out, e)}") from None
    try:
        fd = os.open(os.path.join(out, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SourceError(f"--out {out} cannot be written: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown holder"
            raise SourceError(f"--out {out} is being written by another write_shards right now ({holder}): wait "
                              "for it, or write into another folder") from None
        except OSError as e:  # a filesystem without flock (Lustre mounted without it)
            raise SourceError(f"--out {out} cannot be locked for this writer alone: {e.strerror or e}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        os.close(fd)


def prepare_out(out: str, overwrite: bool):
    names = os.listdir(out)
    ours = [n for n in names if SHARD_NAME.fullmatch(n) or n == "manifest.json"]
    if ours and not overwrite:
        raise SourceError(f"{out} already holds shards or a manifest; pass --overwrite to replace them")
    for n in ours + [n for n in names if n.startswith(".") and n.endswith(".tar.tmp")]:  # + a crashed run's
        os.remove(os.path.join(out, n))


def samples_of(item: Item, jpg: bytes, layout: str):
    """(key, jpg, json bytes) per sample of one image."""
    if layout == "image":
        yield item.key, jpg, json.dumps(item.captions, ensure_ascii=False).encode()
    else:
        for cap, cid in zip(item.captions, item.caption_ids):
            yield f"{item.key}-s{sanitize(cid)}", jpg, json.dumps([cap], ensure_ascii=False).encode()


def _encoded(items: list[Item], max_side: int, quality: int, workers: int):
    """(item, jpg or None, reason) in source order, decoded by a process pool when workers > 1."""
    todo = [it for it in items if it.captions]
    load = functools.partial(load_image, max_side=max_side, quality=quality)
    pool = Pool(workers) if workers > 1 else None
    results = pool.imap(load, [it.image for it in todo], chunksize=8) if pool else map(load, (it.image for it in todo))
    try:
        for item in items:  # imap yields in submission order: the same sequence for any worker count
            yield (item, *next(results)) if item.captions else (item, None, "no captions")
    finally:
        if pool:
            pool.terminate()


def write_shards(items: list[Item], out: str, *, splits: list[str], layout: str = "image", max_side: int = MAX_SIDE,
                 quality: int = 90, samples_per_shard: int = 1000, max_shard_size: int = 10**9, workers: int = 1,
                 source: dict | None = None, options: dict | None = None, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Writes the items of `splits` to out/ and returns the manifest (also written to out/manifest.json)."""
    items = sorted((it for it in items if it.split in splits), key=lambda it: splits.index(it.split))  # stable
    if not items:
        raise SourceError(f"no images in split(s) {', '.join(splits)}")
    if not any(os.path.isfile(it.image) for it in items):
        raise SourceError(f"no images found: none of the {len(items)} image files exist (first: {items[0].image})")
    out = os.path.abspath(out)
    if marks := expanding_marks(out):
        raise SourceError(f"--out {out} holds {' '.join(marks)}, which the data.*_shards specs naming its shards "
                          "would expand: write into a plain folder name")
    with writing_into(out):
        prepare_out(out, overwrite)
        sinks = {s: ShardSink(out, s, samples_per_shard, max_shard_size) for s in splits}
        counts = {s: {"images": 0, "captions": 0, "samples": 0, "skipped": 0} for s in splits}
        skipped = []
        bar = tqdm(total=len(items), unit="img", desc=f"writing {out}", disable=not progress)
        for item, jpg, reason in _encoded(items, max_side, quality, workers):
            bar.update()
            c = counts[item.split]
            if jpg is None:
                c["skipped"] += 1
                skipped.append({"key": item.key, "split": item.split, "image": item.image, "reason": reason})
                continue
            c["images"] += 1
            c["captions"] += len(item.captions)
            for sample in samples_of(item, jpg, layout):
                sinks[item.split].write(*sample)
                c["samples"] += 1
        bar.close()
        manifest = {"source": source or {}, "options": options or {}, "splits": {}, "skipped": skipped}
        for s in splits:
            sinks[s].close()
            shards = sinks[s].shards
            manifest["splits"][s] = {**counts[s], "shards": len(shards),
                                     "spec": brace_spec([x["name"] for x in shards]), "files": shards}
        tmp = os.path.join(out, ".manifest.json.tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, os.path.join(out, "manifest.json"))  # last: its presence marks a complete output
        return manifest


def summary(manifest: dict, out: str) -> str:
    """Counts per split, skips by reason, and the data.*_shards overrides (quoted: the shell would expand braces)."""
    lines, overrides = [], []
    for s, m in manifest["splits"].items():
        spec = os.path.join(os.path.abspath(out), m["spec"]) if m["spec"] else ""
        lines.append(f"{s}: {m['images']} images, {m['captions']} captions, {m['samples']} samples in "
                     f"{m['shards']} shards, {m['skipped']} skipped")
        if s in ("train", "val", "test") and spec:
            overrides.append(shlex.quote(f"data.{s}_shards={spec}"))
        elif spec:
            lines.append(f"  {s} shards: {spec} (join specs with '::' to read several)")
    reasons = {}
    for x in manifest["skipped"]:
        r = re.split(r"\s*[:(]", x["reason"])[0]  # 'unreadable image: ...', 'image too large (N pixels, ...)'
        reasons[r] = reasons.get(r, 0) + 1
    if reasons:
        lines.append("skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) +
                     f" (listed in {os.path.join(out, 'manifest.json')})")
    lines.append("config overrides: " + " ".join(overrides))
    return "\n".join(lines)


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


class ShardsParser(OneLineParser):
    """One line for bad arguments, in every subcommand, with the prefix of write_shards' other errors."""
    name = "write_shards"


def parser() -> argparse.ArgumentParser:
    common = ShardsParser(add_help=False)
    common.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    common.add_argument("--splits", help="comma-separated splits to write (default: all in the source)")
    common.add_argument("--layout", choices=["image", "caption"], default="image",
                        help="image: one sample per image with all captions (DiCO, eval); caption: one per caption (XE)")
    common.add_argument("--max-side", type=int, default=MAX_SIDE,
                        help=f"shrink so the longer side is at most N (default {MAX_SIDE}, COCO's size; 0: keep the "
                             "size and copy plain JPEGs byte for byte)")
    common.add_argument("--quality", type=int, default=90, choices=range(1, 101), metavar="1..100",
                        help="JPEG quality when re-encoding")
    common.add_argument("--samples-per-shard", type=_positive, default=1000)
    common.add_argument("--max-shard-size", type=parse_size, default="1GB", help="e.g. 500MB, 1GB, 2GiB")
    common.add_argument("--workers", type=_positive, default=min(8, os.cpu_count() or 1),
                        help="decoding/resizing processes (the output does not depend on it)")
    common.add_argument("--overwrite", action="store_true", help="replace shards and manifest already in --out")
    common.add_argument("--no-progress", action="store_true")
    p = ShardsParser(prog="python -m dico_scale.data.write_shards", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="source", required=True)
    k = sub.add_parser("karpathy", parents=[common], help="COCO / Flickr30k Karpathy split file + image root")
    k.add_argument("--split-file", required=True, help="dataset_coco.json, dataset_flickr30k.json, ...")
    k.add_argument("--image-root", required=True, help="folder the split file's filepath/filename are relative to")
    k.add_argument("--restval", choices=["train", "separate"], default="train",
                   help="fold COCO's restval into train, or write it as its own split")
    j = sub.add_parser("jsonl", parents=[common], help='one {"image", "captions", "id"?, "split"?} per line')
    j.add_argument("--input", required=True)
    j.add_argument("--image-root", help="folder relative image paths start from (default: the jsonl's folder)")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.max_side < 0:
        print("write_shards: error: --max-side must be >= 0", file=sys.stderr)
        return 2
    try:
        if a.source == "karpathy":
            if not os.path.isdir(a.image_root):
                raise SourceError(f"image root not found: {a.image_root}")
            items = read_karpathy(a.split_file, a.image_root, a.restval)
            source = {"kind": "karpathy", "split_file": os.path.abspath(a.split_file),
                      "image_root": os.path.abspath(a.image_root)}
        else:
            root = a.image_root if a.image_root is not None else os.path.dirname(os.path.abspath(a.input))
            if not os.path.isdir(root):
                raise SourceError(f"image root not found: {root}")
            items = read_jsonl(a.input, root)
            source = {"kind": "jsonl", "input": os.path.abspath(a.input), "image_root": os.path.abspath(root)}
        check_unique(items)
        splits = select_splits(items, a.splits)
        options = {k: getattr(a, k) for k in ("layout", "max_side", "quality", "samples_per_shard", "max_shard_size")}
        options["restval"] = getattr(a, "restval", None)
        manifest = write_shards(items, a.out, splits=splits, layout=a.layout, max_side=a.max_side, quality=a.quality,
                                samples_per_shard=a.samples_per_shard, max_shard_size=a.max_shard_size,
                                workers=a.workers, source=source, options=options, overwrite=a.overwrite,
                                progress=not a.no_progress)
    except SourceError as e:
        print(f"write_shards: error: {e}", file=sys.stderr)
        return 2
    print(summary(manifest, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
