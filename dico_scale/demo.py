"""`make demo`: evaluator -> xe -> dico on the synthetic shapes data with 2 CPU ranks under the deepspeed launcher,
then a table of XE vs DiCO on held-out test images (CIDEr and the evaluator's score)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

STAGES = ("evaluator", "xe", "dico")
from .config import REPO_ROOT


def demo_config(stage: str) -> str:
    return os.path.join(REPO_ROOT, "configs", "demo", f"{stage}.yaml")


def train_stage(stage: str, ranks: int, overrides: list[str]) -> None:
    cmd = ["deepspeed", "--num_gpus", str(ranks), os.path.join(REPO_ROOT, "dico_scale", "train.py"),
           "--config", demo_config(stage), *overrides]
    print(f"\n=== {stage}: {' '.join(cmd)}", flush=True)
    start = time.time()
    code = subprocess.run(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu"}).returncode
    if code != 0:
        raise SystemExit(f"dico_scale.demo: stage {stage} failed with exit code {code} (its output is above)")
    print(f"=== {stage} done in {time.time() - start:.0f} s", flush=True)


def compare(overrides: list[str]) -> dict:
    """Captions the test split with the XE and the DiCO captioner (one process, no DeepSpeed needed)."""
    import torch

    from .config import load_config
    from .data.pipeline import Collate, eval_loader
    from .data.tokenizer import CaptionTokenizer
    from .engine import load_weights
    from .models.captioner import Captioner
    from .models.clip import register_model_configs
    from .models.evaluator import Evaluator, distinct_preprocess
    from .train import data_shards
    from .validate import caption_metrics, caption_split, score_records

    cfg = load_config(demo_config("dico"), overrides)
    register_model_configs(cfg.clip_model_configs)
    shards = data_shards(cfg)
    evaluator, tok = Evaluator(cfg.evaluator), CaptionTokenizer()
    results = {}
    for name, stage_dir in (("XE", "xe"), ("DiCO", "dico")):
        captioner = Captioner(cfg.captioner, tok)
        load_weights(captioner, os.path.join(os.path.dirname(cfg.train.output_dir), stage_dir, "model.pt"))
        eval_pre = distinct_preprocess(evaluator, captioner.preprocess)
        loader = eval_loader(shards["test"], Collate(captioner.preprocess, eval_pre, tok, cfg.data.max_caption_tokens, seed=0), 25)
        records = caption_split(captioner, tok, loader, cfg.generation.beam_size, cfg.generation.max_len,
                                torch.device("cpu"), {"evaluator": evaluator})
        records = score_records(records, evaluator)  # as in-loop validation scores
        results[name] = {"metrics": caption_metrics(records), "examples": records[:3]}
    return results


def print_table(results: dict) -> None:
    n = int(next(iter(results.values()))["metrics"]["images"])
    print(f"\nXE vs DiCO on {n} held-out test images")
    print(f"{'model':<8}{'CIDEr':>10}{'evaluator CLIP-S':>20}")
    for name, r in results.items():
        m = r["metrics"]
        print(f"{name:<8}{m['cider']:>10.3f}{m['evaluator_score']:>20.3f}")
    for i, ex in enumerate(results["XE"]["examples"]):
        print(f"\n{ex['key']}: ref  {ex['refs'][0]}\n{'':>{len(ex['key'])}}  XE   {ex['caption']}"
              f"\n{'':>{len(ex['key'])}}  DiCO {results['DiCO']['examples'][i]['caption']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dico_scale.demo", description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2, help="CPU ranks per stage")
    p.add_argument("--keep", action="store_true", help="keep runs/demo from an earlier demo instead of starting over")
    p.add_argument("--workdir", default=".", help="where runs/demo and data/demo go (default: here)")
    p.add_argument("overrides", nargs="*", help="key=value overrides passed to every stage")
    args = p.parse_args(argv)
    os.chdir(args.workdir)
    if not args.keep:
        shutil.rmtree("runs/demo", ignore_errors=True)
    start = time.time()
    for stage in STAGES:
        train_stage(stage, args.ranks, args.overrides)
    results = compare(args.overrides)
    print_table(results)
    with open("runs/demo/summary.json", "w") as f:
        json.dump(results, f, indent=1)
    print(f"\ndemo finished in {time.time() - start:.0f} s; MLflow store: runs/demo/mlflow.db "
          f"(mlflow ui --backend-store-uri sqlite:///runs/demo/mlflow.db)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
