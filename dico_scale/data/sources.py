"""Image-caption sources for the shard writer: the Karpathy split files of COCO / Flickr30k, and a generic jsonl.

Both give a list of Items in source order. Keys are stable ids (from the dataset's own ids or the file name), never
from an item's position, and contain no dots: webdataset cuts a tar member name at its first dot to find the key.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass


class SourceError(ValueError):
    """Bad input the writer cannot work around; its message is one line naming the culprit."""


@dataclass
class Item:
    key: str
    image: str  # path of the image file
    split: str
    captions: list[str]
    caption_ids: list[str]  # per-caption ids (Karpathy sentids, else positions) for the per-caption layout


def sanitize(name: str) -> str:
    """A key-safe form of a file stem or id: letters, digits, '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "x"


def _load_json(path: str):
    if not os.path.isfile(path):
        raise SourceError(f"split file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path} is not valid JSON: {e}") from None


def read_karpathy(split_file: str, image_root: str, restval: str = "train") -> list[Item]:
    """Items of a Karpathy split file (dataset_coco.json, dataset_flickr30k.json, dataset_flickr8k.json).

    restval="train" folds COCO's restval images into train (the usual 113k training set); "separate" keeps them.
    """
    data = _load_json(split_file)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise SourceError(f"{split_file} has no 'images' list: not a Karpathy split file")
    prefix = sanitize(str(data.get("dataset", ""))) if data.get("dataset") else ""
    items = []
    for i, img in enumerate(images):
        try:
            name, split, sentences = img["filename"], img["split"], img.get("sentences", [])
            captions = [s["raw"].strip() for s in sentences]
            ids = [str(s.get("sentid", j)) for j, s in enumerate(sentences)]
        except (KeyError, TypeError, AttributeError) as e:
            raise SourceError(f"{split_file}: images[{i}] lacks filename/split/sentences[].raw ({e!r})") from None
        folder = img.get("filepath", "")
        for field, v in (("filename", name), ("filepath", folder), ("split", split)):
            if not isinstance(v, str):  # null or 5: a TypeError in os.path, or a split named None
                raise SourceError(f"{split_file}: images[{i}] {field} is {json.dumps(v)}, not a string")
        stem = str(img["cocoid"]) if "cocoid" in img else os.path.splitext(name)[0]
        key = f"{prefix}-{sanitize(stem)}" if prefix else sanitize(stem)
        if split == "restval" and restval == "train":
            split = "train"
        kept = [(c, s) for c, s in zip(captions, ids) if c]
        items.append(Item(key, os.path.join(image_root, folder, name), split,
                          [c for c, _ in kept], [s for _, s in kept]))
    return items


def read_jsonl(path: str, image_root: str) -> list[Item]:
    """Items of a jsonl file: {"image": path, "captions": [...], "id": optional, "split": optional (train)}."""
    if not os.path.isfile(path):
        raise SourceError(f"input file not found: {path}")
    items = []
    with open(path, "rb") as f:  # decoded line by line: a binary file is one line naming where, not a traceback
        lines = f.read().splitlines()  # \n, \r\n and old Macs' lone \r
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise SourceError(f"{path} line {n}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise SourceError(f"{path} line {n}: not valid JSON: {e}") from None
        caps = row.get("captions") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(caps, list) \
                or not all(isinstance(c, str) for c in caps):
            raise SourceError(f"{path} line {n}: needs 'image' (a path) and 'captions' (a list of strings)")
        split = row.get("split", "train")  # null is no split name (str() made it 'None')
        if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_]+", split):
            raise SourceError(f"{path} line {n}: split {json.dumps(split)} must be letters, digits or '_'")
        ident = row.get("id", os.path.splitext(os.path.basename(row["image"]))[0])
        if isinstance(ident, bool) or not isinstance(ident, (str, int)):
            raise SourceError(f"{path} line {n}: id {json.dumps(ident)} must be a string or an integer (or left "
                              "out: the image's file name)")
        ident = str(ident)
        kept = [(c.strip(), str(j)) for j, c in enumerate(caps) if c.strip()]
        items.append(Item(sanitize(ident), os.path.join(image_root, row["image"]), split,
                          [c for c, _ in kept], [s for _, s in kept]))
    return items


def check_unique(items: list[Item]):
    seen = {}
    for it in items:
        if it.key in seen:
            raise SourceError(f"duplicate key {it.key!r}: {seen[it.key]} and {it.image} (give each item a unique id)")
        seen[it.key] = it.image
