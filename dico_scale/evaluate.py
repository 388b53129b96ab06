"""Evaluates a captioner checkpoint over a split: BLEU, METEOR, ROUGE-L, CIDEr, SPICE (pycocoevalcap), CLIP-S / PAC-S
and their Ref- variants, retrieval with the generated captions, caption statistics; one JSON, logged to MLflow.

  python -m dico_scale.evaluate --checkpoint PATH [--shards SPEC] [options] [key=value ...]
  deepspeed --num_gpus N dico_scale/evaluate.py --checkpoint PATH [--shards SPEC] [options] [key=value ...]

Every rank captions its share of the split; rank 0 gathers the records (one per image key, however the shards were
split) and computes every metric, since CIDEr's document frequencies and retrieval need the whole split. Captioning,
CIDEr, the evaluator score and retrieval recall are the functions in-loop validation uses (dico_scale/validate.py,
dico_scale/metrics.py): `CIDEr` and `evaluator_score` equal the val/cider and val/evaluator_score of the same
checkpoint on the same split (same batch size and world size).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (deepspeed dico_scale/X.py): our folder must not shadow other modules
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from dico_scale import exit_codes  # noqa: E402
from dico_scale.config import EvaluatorConfig  # noqa: E402
from dico_scale.errors import ConfigError, OneLineParser  # noqa: E402
from dico_scale.eval_data import (EvalCollate, check_shards, counted, data_report, resolve_shards,  # noqa: E402
                                  shards_arg, training_captions)

PREFIX = "A photo depicts "  # what the official CLIP-S and PAC-S tools put before every text they encode


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="dico_scale.evaluate", description="Evaluates a captioner checkpoint over a "
                                "split (see docs/evaluation.md).")
    p.add_argument("--checkpoint", required=True, help="model.pt export, checkpoint tag folder or "
                   "transformers folder (an export's hf/, or the model a run starts from)")
    p.add_argument("--shards", default="", help="a split of the run's config (val, test) or a webdataset spec "
                   "(default: the split --split names, else test)")
    p.add_argument("--split", default="", help="split label for file and metric names (default: derived from "
                   "--shards); a split of the config alone selects it")
    p.add_argument("--out", default="", help="result JSON (default: <checkpoint dir>/eval_<split>.json)")
    p.add_argument("--train-shards", default="", help="training shards for the novelty statistic "
                   "(default: the config's training split; none: skipped)")
    p.add_argument("--clip", default="", metavar="MODEL[:WEIGHTS]", help="CLIP-S evaluator (replaces the config's "
                   "if that one is CLIP-S, else adds to it)")
    p.add_argument("--pacs", default="", metavar="MODEL[:WEIGHTS]", help="PAC-S evaluator, e.g. "
                   "ViT-B-32-quickgelu:/models/pacs_clip_ViT-B-32.pth")
    p.add_argument("--no-prefix", action="store_true", help=f"encode texts without '{PREFIX}' (as the DiCO code)")
    p.add_argument("--no-spice", action="store_true", help="skip SPICE (slow: minutes on COCO)")
    p.add_argument("--ngrams", default="1,2,3,4", help="n of the repeated-n-gram rates (comma-separated)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="images per rank per batch (default: train.micro_batch_size)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config")
    return p


def parse_args(argv):
    """(args, cfg, meta): everything checked before any model is built or a process group starts."""
    from dico_scale.export import checkpoint_meta, load_run_config
    from dico_scale.preflight import inside, out_file_problem

    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        raise ConfigError(f"unknown command-line argument '{unknown[0]}' (overrides are key=value)")
    try:
        ngrams = tuple(int(n) for n in args.ngrams.split(","))
        assert all(n > 0 for n in ngrams)
    except (ValueError, AssertionError):
        raise ConfigError(f"--ngrams '{args.ngrams}' is not a comma-separated list of positive integers") from None
    args.ngrams = ngrams
    if args.batch_size < 0:
        raise ConfigError(f"--batch-size {args.batch_size} must be >= 0 (0: train.micro_batch_size)")
    if args.split and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.split):  # '../x' would write elsewhere
        raise ConfigError(f"--split '{args.split}' is not a plain name (letters, digits, '_', '.', '-'): it names "
                          f"the result file eval_<split>.json and the metrics eval/<split>/...")
    meta = checkpoint_meta(args.checkpoint)
    cfg = load_run_config(meta, args.overrides)
    args.evaluators = evaluator_configs(args, cfg)
    args.spec, split = resolve_shards(shards_arg(args.shards, args.split), cfg)
    args.split = args.split or split
    given, args.out = bool(args.out), args.out or str(default_out(meta, args.split))
    if problem := out_file_problem(args.out):  # now, not after captioning the whole split
        raise ConfigError(f"--out {problem}" if given else f"the default --out {problem} (pass --out)")
    out = Path(args.out)  # the checkpoint itself, or a file of its folder that is not an earlier result
    if inside(args.out, meta["path"]) and (out.resolve() == Path(meta["path"]).resolve()
                                           or out.exists() and not out.name.startswith("eval_")):
        raise ConfigError(f"--out '{args.out}' would overwrite the checkpoint '{meta['path']}' or one of its files")
    check_shards(args.spec, "--shards")
    args.train_spec, args.train_note = "", "novelty skipped: --train-shards none"
    if args.train_shards and args.train_shards != "none":
        args.train_spec = args.train_shards
        check_shards(args.train_spec, "--train-shards")  # asked for explicitly: must be right
    elif not args.train_shards:
        try:
            args.train_spec = resolve_shards("train", cfg, required=False)[0]
            if not args.train_spec:  # a transformers folder's config (export.folder_meta)
                raise ConfigError("the checkpoint's config has no training split (--train-shards SPEC)")
            check_shards(args.train_spec, "the config's training split")
        except ConfigError as e:  # the training data may be gone: the statistic is skipped, not the evaluation
            args.train_spec, args.train_note = "", f"novelty skipped: {e}"
    return args, cfg, meta


def evaluator_configs(args, cfg) -> dict[str, EvaluatorConfig]:
    """{metric: config}: the run's evaluator under the metric it names, then --clip / --pacs."""
    prefix = "" if args.no_prefix else PREFIX
    e = cfg.evaluator
    out = {e.metric: EvaluatorConfig(e.model, e.weights, e.metric, prefix)}
    for metric, spec in (("clips", args.clip), ("pacs", args.pacs)):
        if spec:
            model, _, weights = spec.partition(":")
            if weights:  # reads headers only: a file of the wrong kind fails before any model or process group
                from dico_scale.models.clip_weights import sniff_weights_format
                sniff_weights_format(weights, f"--{metric.replace('clips', 'clip')} weights")
            out[metric] = EvaluatorConfig(model, weights, metric, prefix)
    return out


# ---- distributed captioning ------------------------------------------------------------------------------------------

def init_ranks(cfg):
    """(rank, world, device). Under a launcher: a gloo group (only Python objects travel, on CPU or GPU runs alike);
    alone: no process group at all."""
    import torch
    import torch.distributed as dist

    from dico_scale.engine import cpu_threads, uses_cpu

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if not uses_cpu(cfg):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(cpu_threads(cfg.train.threads, local_world))
    return rank, world, torch.device("cpu")


# ---- scoring on rank 0 -----------------------------------------------------------------------------------------------

OWN = "evaluator"  # the run's own evaluator, when --clip / --pacs replaced it under its metric's name


def score(records: list[dict], evaluators: dict, seen, args, own: tuple[str, str | None] = (OWN, None)
          ) -> tuple[dict, dict, list[dict]]:
    """(metrics, errors, per-image entries). `own`: (name in evaluators, caption prefix) of the run's own evaluator,
    whose score with the run's caption prefix is `evaluator_score`, the in-loop val/evaluator_score."""
    import torch

    from dico_scale.metrics import SCORE_NAMES, caption_stats, clip_scores, coco_scores, mean, recall_at_k
    from dico_scale.validate import evaluator_scores

    metrics, errors = coco_scores(records, spice=not args.no_spice)
    captions, refs = [r["caption"] for r in records], [r["refs"] for r in records]
    per_image = [{"key": r["key"], "caption": r["caption"], "refs": r["refs"]} for r in records]
    for name, ev in evaluators.items():
        if name not in SCORE_NAMES:
            continue
        image_feats = torch.stack([r["feats"][name] for r in records])
        s, ref_s, cand = clip_scores(ev, image_feats, captions, refs, ev.weight)
        plain, with_refs = SCORE_NAMES[name]
        metrics[plain], metrics[with_refs] = mean(s.tolist()), mean(ref_s.tolist())
        metrics.update({f"{plain}/{k}": v for k, v in recall_at_k(image_feats, cand).items()})
        for entry, a, b in zip(per_image, s.tolist(), ref_s.tolist()):
            entry[plain], entry[with_refs] = a, b
    if own[0] in evaluators:
        own_scores = evaluator_scores(records, evaluators[own[0]], own[0], prefix=own[1])
        metrics["evaluator_score"] = mean(own_scores)
        for entry, a in zip(per_image, own_scores):
            entry["evaluator_score"] = a
    metrics.update(caption_stats(captions, seen, args.ngrams))
    metrics["images"] = len(records)
    return metrics, errors, per_image


def default_out(meta: dict, split: str) -> Path:
    """Inside a checkpoint tag, beside an export file; beside a transformers folder, named after it (an export's hf/
    must not overwrite its model.pt's results)."""
    p = Path(meta["path"])
    if meta.get("folder"):
        return p.parent / f"eval_{p.name}_{split}.json"
    return (p if meta["is_tag"] else p.parent) / f"eval_{split}.json"


def mlflow_run(cfg, meta: dict, split: str):
    """(client, run id, whether it is the checkpoint's training run); a new run 'eval-...' when that is unknown."""
    from mlflow.tracking import MlflowClient

    from dico_scale.tracking import Tracker, tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    if meta["mlflow_run_id"]:
        try:
            client.get_run(meta["mlflow_run_id"])
            return client, meta["mlflow_run_id"], True
        except Exception:  # another store, or the run was deleted
            pass
    name = Path(meta["path"]).name if meta.get("folder") else f"{meta['stage']}-step{meta['step']}"
    cfg.tracking.run_name = f"eval-{name}-{split}"
    tracker = Tracker(cfg, rank=0)  # creates the experiment if needed, logs the config as params
    tracker.finish()
    return tracker.client, tracker.run_id, False


def log_mlflow(client, run_id: str, split: str, metrics: dict, step, out: Path) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(f"eval/{split}/{k}", float(v), now, int(step or 0)) for k, v in metrics.items()
             if isinstance(v, (int, float)) and math.isfinite(v)]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i:i + 500])
    client.log_text(run_id, out.read_text(), f"eval/step_{int(step or 0):08d}/eval_{split}.json")


def _finite(x):
    """JSON has no NaN: None instead."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def run(args, cfg, meta) -> int:
    from collections import Counter

    import torch

    from dico_scale.data.pipeline import eval_loader
    from dico_scale.export import load_captioner
    from dico_scale.models.clip import register_model_configs
    from dico_scale.models.clip_scorer import ClipScorer
    from dico_scale.models.generation import search_options
    from dico_scale.preflight import check_device
    from dico_scale.validate import caption_split, gather_records

    check_device(cfg)
    rank, world, device = init_ranks(cfg)
    register_model_configs(cfg.clip_model_configs)  # the evaluators' (a Hugging Face captioner registers none)
    torch.manual_seed(cfg.train.seed)  # whatever a build draws before its weights load, alike on every rank
    captioner, tok = load_captioner(cfg, meta, device)
    evaluators = {}
    for name, ev_cfg in args.evaluators.items():
        evaluators[name] = ClipScorer(ev_cfg).to(device)
    # evaluator_score: the run's own evaluator with the run's caption prefix, as in-loop validation scores
    e, mine = cfg.evaluator, args.evaluators[cfg.evaluator.metric]
    own = (e.metric, e.caption_prefix)
    if (mine.model, mine.weights) != (e.model, e.weights):  # --clip / --pacs replaced it: scored separately
        evaluators[OWN], own = ClipScorer(e).to(device), (OWN, None)
    collate = EvalCollate(captioner.preprocess, {n: ev.preprocess for n, ev in evaluators.items()})
    loader = eval_loader(args.spec, collate, args.batch_size or cfg.train.micro_batch_size, cfg.data.num_workers)
    totals = Counter()
    records = gather_records(caption_split(captioner, tok, counted(loader, totals), cfg.generation, device, evaluators))
    data, data_line, data_tracked = data_report(totals)
    seen, novelty_data = None, None
    if args.train_spec:
        seen, tally = training_captions(args.train_spec, rank, world)
        novelty_data, novelty_line, _ = data_report(tally)
    if not records:
        raise ConfigError(f"no valid samples in '{args.spec}'")
    if rank != 0:
        return 0

    metrics, errors, per_image = score(records, evaluators, seen, args, own)
    notes = [f"{n}: random weights (no evaluator weights file)" for n, c in args.evaluators.items() if not c.weights]
    if seen is None:
        notes.append(args.train_note)
    if args.no_spice:
        notes.append("SPICE skipped: --no-spice")
    out = Path(args.out)
    client = run_id = None
    if cfg.tracking.enabled:
        try:
            client, run_id, same = mlflow_run(cfg, meta, args.split)
            notes.append(f"MLflow: {'training run' if same else 'new run'} {run_id}")
        except Exception as e:  # the results still go to the JSON
            errors["MLflow"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    result = {"checkpoint": meta["path"], "stage": meta["stage"], "step": meta["step"], "split": args.split,
              "shards": args.spec, "images": len(records), "mlflow_run_id": run_id,
              "settings": {"beam_size": cfg.generation.candidates, "max_len": cfg.generation.max_len,
                           **search_options(cfg.generation),
                           "caption_prefix": "" if args.no_prefix else PREFIX, "ngrams": list(args.ngrams),
                           "evaluators": {n: {"model": c.model, "weights": c.weights}
                                          for n, c in args.evaluators.items()},
                           "evaluator_score": {"model": e.model, "weights": e.weights, "metric": e.metric,
                                               "caption_prefix": e.caption_prefix}},
              "data": data, "novelty_data": novelty_data, "metrics": metrics, "errors": errors, "notes": notes,
              "captions": per_image}
    if problem := write_result(out, json.dumps(_finite(result), indent=1)):
        print(f"dico_scale.evaluate: error: {problem}", file=sys.stderr)
        return 1
    for k, v in metrics.items():
        print(f"{k}\t{'null' if v is None else round(v, 4) if isinstance(v, float) else v}")
    for k, v in errors.items():
        print(f"dico_scale.evaluate: {k} not computed: {v}", file=sys.stderr)
    print(data_line)
    if novelty_data is not None:
        print(f"novelty scan of the training split's {novelty_line}")
    print(f"wrote {out}")
    if client is not None:
        try:
            log_mlflow(client, run_id, args.split, {**metrics, **data_tracked}, meta["step"], out)
        except Exception as e:
            print(f"dico_scale.evaluate: MLflow logging failed: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
            return 1
    return 0


def write_result(out: Path, text: str) -> str | None:
    """The result file, written whole or not at all (an earlier result there stays): why it failed, else None."""
    from dico_scale.checkpoint import describe_save_failure

    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, out)
    except OSError as e:  # a full disk
        tmp.unlink(missing_ok=True)
        return describe_save_failure(e, out, "result")
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        args, cfg, meta = parse_args(argv)
        code = run(args, cfg, meta)
    except ConfigError as e:
        print(f"dico_scale.evaluate: error: {e}", file=sys.stderr)
        code = 2
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    exit_codes.leave_main(main, "dico_scale.evaluate")  # without the interpreter's teardown (seconds per process)
