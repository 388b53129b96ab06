"""`make demo`: evaluator -> xe -> dico (the stage table's chain to dico) on the synthetic shapes data with 2 CPU
ranks under torchrun, then a table of XE vs DiCO on held-out test images (CIDEr and the evaluator's
score)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time

from . import exit_codes
from .config import REPO_ROOT, setting
from .errors import OneLineParser
from .launch import demo_config, train_stage
from .models.tiny_vlm import VLM_FAMILIES, prompt_overrides
from .stages import STAGES, chain, stage_overrides


def compare(overrides: list[str]) -> dict:
    """Captions the test split with the XE and the DiCO captioner of the demo's runs."""
    from .config import load_config
    from .validate import heldout

    cfg = load_config(demo_config("dico"), overrides)
    runs = os.path.dirname(cfg.train.output_dir)
    return heldout(cfg, {STAGES[s].label: os.path.join(runs, s, "model.pt") for s in ("xe", "dico")})


def print_examples(results: dict) -> None:
    for i, ex in enumerate(results["XE"]["examples"]):
        print(f"\n{ex['key']}: ref  {ex['refs'][0]}\n{'':>{len(ex['key'])}}  XE   {ex['caption']}"
              f"\n{'':>{len(ex['key'])}}  DiCO {results['DiCO']['examples'][i]['caption']}")


def print_table(results: dict) -> None:
    n = int(next(iter(results.values()))["metrics"]["images"])
    print(f"\nXE vs DiCO on {n} held-out test images")
    print(f"{'model':<8}{'CIDEr':>10}{'evaluator CLIP-S':>20}")
    for name, r in results.items():
        m = r["metrics"]
        print(f"{name:<8}{m['cider']:>10.3f}{m['evaluator_score']:>20.3f}")


def print_next(seconds: float, folder: str | None = None, captioner: list[str] = ()) -> None:
    """Where to look next: commands to paste in the folder the demo ran in (its paths are relative); `folder`: that
    folder, named when it is not where the demo was started (--workdir); `captioner`: the demo's captioner_overrides,
    which compare's runs need too (the demo's configs describe the built-in captioner). make compare is for the
    repository's own folder; elsewhere compare's config is named by its full path."""
    model = "runs/demo/dico/model.pt"
    in_repo = os.path.samefile(os.getcwd(), REPO_ROOT)
    config = os.path.relpath(demo_config("compare")) if in_repo else demo_config("compare")
    compare = "make compare" if in_repo and not captioner else " ".join(
        ["python -m dico_scale.compare --config", shlex.quote(config), *map(shlex.quote, captioner)])
    rows = [("this table, examples", "runs/demo/summary.json"),
            ("every stage's curves", "mlflow ui --backend-store-uri sqlite:///runs/demo/mlflow.db"),
            ("all caption metrics", f"python -m dico_scale.evaluate --checkpoint {model} --no-spice"),
            ("your own images", f"python -m dico_scale.caption --checkpoint {model} IMAGE.jpg"),
            ("DiCO vs SCST", compare)]
    print(f"\ndemo finished in {seconds:.0f} s. Where to look next" + (f", in {folder}:" if folder else ":"))
    for what, cmd in rows:
        print(f"  {what:<22}{cmd}")


def check_stages(overrides: list[str]) -> str | None:
    """Every stage's config with the overrides, loaded and checked as train.py will (seconds); what is wrong, if
    anything. The weight files the chain writes as it goes are left out of the check: they do not exist yet."""
    from .config import load_config
    from .errors import ConfigError

    untrained = ["evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from="]
    for stage in chain("dico"):
        try:
            load_config(demo_config(stage), untrained + overrides)
        except ConfigError as e:
            return f"stage {stage}: config error: {e}"
    return None


def usage_error(message: str) -> int:
    print(f"dico_scale.demo: {message}", file=sys.stderr)
    return exit_codes.CONFIG_ERROR


# --captioner: a MODELS row, or a Hugging Face family of dico_scale.models.tiny (hf_encoder_decoder = vit-gpt2)
CAPTIONER_FAMILIES = {"hf_encoder_decoder": "vit-gpt2", "vit-gpt2": "vit-gpt2", "blip": "blip", "dico_ref": "dico-ref",
                      "hf_vlm": "idefics3", **{f: f for f in VLM_FAMILIES}}
FAMILY_ROWS = {"dico-ref": "dico_ref", **{f: "hf_vlm" for f in VLM_FAMILIES}}  # the others: hf_encoder_decoder
# The keys that chain the stages (configs/demo/): an override of one would break the chain after the first stage
CHAIN_KEYS = ("train.stage", "train.output_dir", "train.init_from", "evaluator.weights",
              "captioner.image_encoder_weights")
DEMO_SIZE = dict(width=128, layers=2, heads=4, image_size=64)  # the built-in demo captioner's width and depth


def captioner_overrides(name: str, root: str = "runs/models", **size) -> list[str]:
    """The overrides that put the demo on captioner `name`; a Hugging Face row gets a tiny random model of its family
    written (once) under `root` by the tests' builder, at the demo's size unless `size` says otherwise."""
    if name == "builtin":
        return []
    family = CAPTIONER_FAMILIES[name]
    folder = os.path.abspath(os.path.join(root, family))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        from .models.tiny import write

        write(family, folder, **{**DEMO_SIZE, **size})
    row = FAMILY_ROWS.get(family, "hf_encoder_decoder")
    return [f"captioner.model={row}", f"captioner.hf_path={folder}", *prompt_overrides(family)]


def main(argv=None) -> int:
    p = OneLineParser(prog="dico_scale.demo", description=__doc__.split("\n\n")[0])  # argparse refills it
    p.add_argument("--ranks", type=int, default=2, help="CPU ranks per stage")
    p.add_argument("--captioner", default="builtin", help="builtin (default), hf_encoder_decoder (= vit-gpt2), "
                   "vit-gpt2, blip, dico_ref, hf_vlm (= idefics3), idefics3, smolvlm (SmolVLM2), qwen2-vl, qwen2.5-vl, "
                   "qwen3-vl, internvl, llava, llava-next, llava-onevision, gemma3, paligemma or paligemma2: a tiny "
                   "random model of that family, written under runs/models/")
    p.add_argument("--keep", action="store_true",
                   help="keep runs/demo from an earlier demo instead of starting over: its finished stages as they are, "
                   "the others continue their checkpoints")
    p.add_argument("--workdir", default=".", help="where runs/demo and data/demo go (default: here)")
    p.add_argument("overrides", nargs="*", help="key=value overrides passed to every stage")
    args = p.parse_args(argv)
    if args.ranks < 1:
        return usage_error(f"--ranks {args.ranks} must be >= 1")
    origin = os.getcwd()
    try:
        os.makedirs(args.workdir, exist_ok=True)  # a fresh folder is the usual --workdir
        os.chdir(args.workdir)
    except OSError as e:
        return usage_error(f"--workdir {args.workdir!r}: {e.strerror}")
    if args.captioner not in ("builtin", *CAPTIONER_FAMILIES):
        return usage_error(f"--captioner {args.captioner!r} is not one of builtin, {', '.join(CAPTIONER_FAMILIES)}")
    if not args.keep:
        shutil.rmtree("runs/demo", ignore_errors=True)
    start = time.time()
    # --keep: a stage the earlier demo finished (its model.pt) is kept as it is (exported again, its file would
    # change and the next stage's resume would refuse its reference); one it did not finish continues its checkpoints
    resume = ["train.resume=auto"] if args.keep else []
    if item := setting(args.overrides, CHAIN_KEYS):
        return usage_error(f"'{item}': the demo sets {', '.join(CHAIN_KEYS)} per stage (each stage's folder and "
                           "the weights the one before wrote); --workdir moves the whole chain")
    captioner = captioner_overrides(args.captioner)
    overrides = captioner + resume + args.overrides
    if problem := check_stages(overrides):  # now, not after the stages before the one it concerns have trained
        return usage_error(problem)
    for stage in chain("dico"):
        if args.keep and os.path.isfile(f"runs/demo/{stage}/model.pt"):
            print(f"\n=== {stage}: kept from the earlier demo (runs/demo/{stage}/model.pt)", flush=True)
            continue
        train_stage(stage, args.ranks, stage_overrides(overrides, stage),
                    again="the same command with --keep continues the demo")
    results = compare(overrides)
    with open("runs/demo/summary.json", "w") as f:
        json.dump(results, f, indent=1)
    print_examples(results)
    print_table(results)  # last come the numbers and where to look next: what a person reads when it is done
    print_next(time.time() - start, os.getcwd() if os.getcwd() != origin else None, captioner)
    return 0


if __name__ == "__main__":
    from dico_scale.exit_codes import leave_main

    leave_main(main, "dico_scale.demo")  # without the interpreter's teardown (seconds per process)
