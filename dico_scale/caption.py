"""Captions image files with a captioner: a model.pt export, a checkpoint tag folder or a transformers folder.

`python -m dico_scale.caption --checkpoint PATH images... [--beam-size 5 --max-len 20 --length-penalty 1.0]`.

Prints "path<TAB>caption" per image, in the order given (a folder: its .jpg, .jpeg, .png, .webp, .bmp,
.gif, .tif and .tiff files, sorted, not recursive).
Runs on the CPU by default; a model.pt export needs no DeepSpeed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import stat
import sys

if __package__ in (None, ""):  # run as a file (deepspeed dico_scale/X.py): our folder must not shadow other modules
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from dico_scale.errors import ConfigError, OneLineParser  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # formats PIL reads


def image_paths(items: list[str]) -> list[str]:
    paths = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:  # nothing to caption is bad input, as a missing file is, not a silent success
                raise ConfigError(f"folder {item} holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif os.path.exists(item):  # a FIFO or device too: caption_files skips it with its line
            paths.append(item)
        else:
            raise ConfigError(f"no such image file or folder: {item}")
    return paths


def positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def whole(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def parse_args(argv):
    p = OneLineParser(prog="dico_scale.caption", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="model.pt export, checkpoint tag folder or "
                   "transformers folder (an export's hf/, or the model a run starts from)")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--beam-size", type=positive, help="default: the checkpoint's generation.candidates")
    p.add_argument("--max-len", type=positive, help="generated tokens; default: generation.max_len")
    p.add_argument("--length-penalty", type=finite, help="ended beams rank by log-prob sum / length ** this; "
                   "default: generation.length_penalty")
    p.add_argument("--early-stopping", choices=("false", "true", "never"), help="when the beam search stops before "
                   "--max-len (transformers' early_stopping); default: generation.early_stopping")
    p.add_argument("--repetition-penalty", type=finite, help="log-probs of tokens already in the prompt or caption "
                   "are multiplied by this (transformers'); default: generation.repetition_penalty")
    p.add_argument("--no-repeat-ngram-size", type=whole, help="no n-gram of this size twice (0: off; "
                   "transformers'); default: generation.no_repeat_ngram_size")
    p.add_argument("--prompt", help="a vision-language captioner's question about each image (hf_vlm); default: the "
                   "checkpoint's captioner.prompt")
    p.add_argument("--batch-size", type=positive, default=16)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    return p.parse_args(argv)


def load_pixels(preprocess, path: str):
    """One image file as the captioner's (open_clip) eval transform sees it, in the official CLIP-S / PAC-S order:
    resize and crop the image in its own mode, convert to RGB last (images.for_eval)."""
    from dico_scale.data.images import for_eval, open_image

    return preprocess(for_eval(open_image(path)))


def caption_files(captioner, tok, paths, cfg, device, batch_size: int):
    """Yields (path, caption or None, error or None) in order; an unreadable image is reported, not fatal."""
    from PIL import UnidentifiedImageError

    from dico_scale.data.pipeline import stacked
    from dico_scale.validate import generate

    for start in range(0, len(paths), batch_size):
        chunk, pixels, failed = paths[start:start + batch_size], [], {}
        for path in chunk:
            try:
                if not stat.S_ISREG(os.stat(path).st_mode):  # reading a FIFO blocks, a device may never end
                    failed[path] = "not a regular file"
                    continue
                pixels.append(load_pixels(captioner.preprocess, path))
            except UnidentifiedImageError:
                failed[path] = "not an image file PIL can read"
            except Exception as e:
                failed[path] = f"{type(e).__name__}: {str(e)[:200]}"
        captions = iter(generate(captioner, tok, stacked(captioner.preprocess, pixels).to(device), cfg.generation)
                        if pixels else [])
        for path in chunk:
            yield (path, None, failed[path]) if path in failed else (path, next(captions), None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from dico_scale.export import checkpoint_meta, load_run_config
        from dico_scale.models.folders import SEARCH_OPTIONS

        paths = image_paths(args.images)
        meta = checkpoint_meta(args.checkpoint)
        # the search flags (argparse's dests) and the generation.* keys they set; unset, the checkpoint's value stands
        flags = {"beam_size": "candidates", "max_len": "max_len", **{k: k for k in SEARCH_OPTIONS}}
        given = {flag: f"generation.{key}" for flag, key in flags.items() if getattr(args, flag) is not None}
        if args.prompt is not None:
            given["prompt"] = "captioner.prompt"
        base = ["evaluator.weights="]  # no evaluator needed here
        try:  # (JSON's quoted string is YAML's too: a prompt is text whatever it holds)
            cfg = load_run_config(meta, base + [f"{k}={json.dumps(getattr(args, flag))}" for flag, k in given.items()])
        except ConfigError as e:
            if not given:
                raise
            load_run_config(meta, base)  # the checkpoint alone loads: the flags are what does not fit
            named = " ".join(f"--{flag.replace('_', '-')} {getattr(args, flag)}" for flag in given)
            raise ConfigError(f"{named} does not fit this checkpoint: {e}") from None
        import torch

        from dico_scale.export import load_captioner

        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ConfigError(f"--device '{args.device}' is not a torch device (cpu, cuda, cuda:1, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device}: CUDA is not available here")
        captioner, tok = load_captioner(cfg, meta, device)
    except ConfigError as e:
        print(f"dico_scale.caption: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    code = 0
    for path, caption, error in caption_files(captioner, tok, paths, cfg, device, args.batch_size):
        if error:
            print(f"dico_scale.caption: skipping {path}: {error}", file=sys.stderr)
            code = 1
        else:
            print(f"{path}\t{caption}", flush=True)
    return code


if __name__ == "__main__":
    from dico_scale.exit_codes import leave_main

    leave_main(main, "dico_scale.caption")  # without the interpreter's teardown (seconds per process)
