"""Our beam search (dico_scale.models.generation) against transformers' `generate`, the search the DiCO reference
code draws its candidates with, on a trained vision-language captioner's exported folder: how often the best beam,
and the k candidates in order, are the same, at each length penalty given (the reference's and the config's default
is 1.0; 0.0 ranks by summed log-probs).

    python benchmarks/beam_vs_generate.py --folder runs/demo/xe/hf --shards 'data/demo/test-*.tar'

(`python -m dico_scale.demo --captioner llava-next` writes such a folder.) Ours is generate's algorithm on the
captioner interface (one prefill per image, the cache expanded to k); a difference is a bug, or a near tie that
floating point rounding breaks another way.
"""
from __future__ import annotations

import glob
import io
import json
import tarfile

import torch
from PIL import Image

from dico_scale.config import load_config
from dico_scale.errors import ConfigError, OneLineParser
from dico_scale.models import build_captioner
from dico_scale.models.captioner import scored_mask
from dico_scale.models.generation import beam_search
from dico_scale.preflight import out_file_problem


def images(pattern: str, n: int) -> list[Image.Image]:
    out = []
    for path in sorted(glob.glob(pattern)):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith((".jpg", ".png")) and len(out) < n:
                    out.append(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
    return out


def captions(rows: torch.Tensor, eos: int, first: int) -> list[tuple[int, ...]]:
    """Each row's caption tokens up to and including EOS, from column `first` on."""
    rows = rows[:, first:]
    return [tuple(r[:int(scored_mask(r[None], eos).sum())].tolist()) for r in rows]


def main(argv=None) -> dict:
    p = OneLineParser(prog="beam_vs_generate.py", description=__doc__.splitlines()[0])  # a bad argument: one line
    p.add_argument("--folder", required=True, help="an hf_vlm captioner's folder (an export's hf/)")
    p.add_argument("--shards", required=True, help="glob of tar shards whose images to caption")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--beams", type=int, default=5)
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--length-penalties", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--prompt", help="captioner.prompt (default: the config's; PaliGemma: '<image>caption en')")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if not glob.glob(args.shards):
        p.error(f"--shards '{args.shards}' matches no file")
    if args.json and (problem := out_file_problem(args.json)):
        p.error(f"--json {problem}")
    prompt = [f"captioner.prompt={json.dumps(args.prompt)}"] if args.prompt else []  # quoted: any text is a prompt
    try:  # a bad --folder or --prompt: one line, not a traceback
        cfg = load_config("configs/demo/xe.yaml", ["evaluator.weights=", "captioner.image_encoder_weights=",
                                                   "train.init_from=", "captioner.model=hf_vlm",
                                                   f"captioner.hf_path={args.folder}", *prompt])
        cap = build_captioner(cfg).eval()
    except ConfigError as e:
        p.error(str(e).splitlines()[0])
    k = args.beams
    tok, pre = cap.tokenizer, cap.preprocess
    same = {lp: {"best": 0, "all": 0} for lp in args.length_penalties}
    pictures = images(args.shards, args.images)
    for im in pictures:
        one = pre.collate([pre(im)])
        with torch.no_grad():
            for lp in args.length_penalties:
                ours, _ = beam_search(cap, cap.image_context(one), k, args.max_len, tok.bos, tok.eos, tok.pad, lp)
                mine = captions(ours[0], tok.eos, 1)
                out = cap.model.generate(**one.tensors, num_beams=k, num_return_sequences=k, length_penalty=lp,
                                         max_new_tokens=args.max_len, do_sample=False, eos_token_id=tok.eos,
                                         pad_token_id=tok.pad, bad_words_ids=[[tok.pad]])  # ours never proposes PAD
                theirs = captions(out, tok.eos, one["input_ids"].size(1))
                same[lp]["best"] += mine[0] == theirs[0]
                same[lp]["all"] += mine == theirs
    result = {"folder": args.folder, "images": len(pictures), "beams": k, "max_len": args.max_len,
              "same": {str(lp): v for lp, v in same.items()}}
    print(f"{len(pictures)} images, k = {k}, at most {args.max_len} tokens: ours vs generate")
    print("| length_penalty | same best beam | same k candidates |\n|---:|---:|---:|")
    for lp, v in same.items():
        print(f"| {lp} | {v['best']} / {len(pictures)} | {v['all']} / {len(pictures)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
