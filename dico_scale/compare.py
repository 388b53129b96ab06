"""`python -m dico_scale.compare --config configs/demo/compare.yaml`: DiCO versus SCST from one XE checkpoint.

DiCO and SCST (optionally also SCST rewarded by CIDEr-D, the classic recipe) start from the same XE captioner (a
model.pt export, or a transformers folder a captioner row reads: a vision-language model as released), with
the same reward and number of steps, each through the real trainer as a child process under torchrun
(`--ranks` ranks: CPU processes, or GPUs where the runs' train.device trains on them) and as a child run of one
MLflow parent run. Then one figure: validation curves over the steps
(evaluator score, CIDEr, mean caption length, repetition, vocabulary; the XE captioner at step 0), each run's
selected checkpoint (train.select_best) marked, and the captions of the same held-out test images; and a table of
the selected checkpoints' metrics on the test split, printed and logged on the parent run.

Single runs do not settle which method is better: `seeds=[0,1,2]` trains every run once per seed (`train.seed`:
data order, dropout, sampled candidates) from the same XE captioner; the table then gives each method's mean and
standard deviation over the seeds, and each SCST run's difference from DiCO paired by seed.

Arguments `key=value` set this command's keys (below, no dot) or, with a dot, a training key of every run
(`train.micro_batch_size=4`). Bad input stops with one line and exit code 2 before anything is trained. `--resume`
continues a compare that stopped, with the same settings: its finished runs kept, a stopped one from its checkpoints.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

from . import exit_codes
from .checks import parse_select_best
from .compare_results import RUNS, by_method, histories, log_parent, paired, print_table, selected_model
from .config import load_config, load_structured, resolve_path, setting
from .errors import ConfigError, OneLineParser, first_line
from .preflight import check_sqlite_store, check_tracking_server, check_vlm_input, out_file_problem, write_problem
from .rewards import RewardSpecError, parse_reward
from .stages import stage_overrides

PROG = "dico_scale.compare"


@dataclass
class CompareConfig:
    xe_checkpoint: str = "runs/demo/xe/model.pt"  # every run's start: a model.pt export, or a transformers folder
    output_dir: str = "runs/demo/compare"  # <output_dir>/<run>: dico, scst, scst_cider; replaced on every compare
    dico_config: str = "configs/demo/dico.yaml"
    scst_config: str = "configs/demo/scst.yaml"
    reward: str = "evaluator"  # the reward of DiCO and SCST alike (a reward spec, see dico_scale/rewards)
    scst_cider: bool = True  # also SCST rewarded by CIDEr-D
    steps: int = 40  # >= 1; optimizer steps of every run
    val_every: int = 5  # >= 1; validation (the curves' points) every that many steps
    select_best: str = "val/evaluator_score"  # each run's selected checkpoint (train.select_best)
    examples: int = 4  # >= 0; held-out images in the figure's caption table
    figure: str = "docs/dico_vs_scst.png"
    overrides: list[str] = field(default_factory=list)  # key=value for every run
    seeds: list[int] = field(default_factory=lambda: [0])  # train.seed of the runs; several: every run once per seed




# The training keys compare sets for every run (plan), and where they come from: an override of one would make the
# runs unequal while the table says they are not, or put them in one folder
OWNED = {"train.seed": "from its key 'seeds' (seeds=[0,1,2])", "train.max_steps": "from its key 'steps'",
         "train.val_every": "from its key 'val_every'", "train.select_best": "from its key 'select_best'",
         "dico.reward": "from its key 'reward'", "scst.reward": "from its key 'reward'",
         "train.init_from": "from its key 'xe_checkpoint'", "train.output_dir": "from its key 'output_dir'",
         "train.resume": "itself (--resume continues a stopped compare)",
         "train.val_max_images": "to 0 (the whole val split, the XE captioner's too)",
         "tracking.run_name": "to the run's name", "tracking.parent_run_id": "to the compare's MLflow run"}
FOLDER_KEYS = ("captioner.model", "captioner.hf_path")  # set from xe_checkpoint when it is a transformers folder


def load(path: str, args: list[str]) -> tuple[CompareConfig, list[str]]:
    """(the compare config, training overrides of every run); ConfigError naming what is wrong."""
    own = [a for a in args if "." not in a.split("=", 1)[0]]
    training = [a for a in args if a not in own]
    c: CompareConfig = load_structured(CompareConfig, path, own)
    c.dico_config, c.scst_config = resolve_path(c.dico_config), resolve_path(c.scst_config)
    for key, lo in (("steps", 1), ("val_every", 1), ("examples", 0)):
        if getattr(c, key) < lo:
            raise ConfigError(f"bad value for compare key '{key}': {getattr(c, key)} must be >= {lo}")
    try:
        parse_reward(c.reward)
    except RewardSpecError as e:
        raise ConfigError(f"bad value for compare key 'reward': '{c.reward}': {e}") from None
    try:
        parse_select_best(c.select_best)
    except ConfigError as e:
        raise ConfigError(str(e).replace("config key 'train.select_best'", "compare key 'select_best'")) from None
    if not c.seeds or min(c.seeds) < 0 or len(set(c.seeds)) < len(c.seeds):
        raise ConfigError(f"bad value for compare key 'seeds': {c.seeds} must be distinct integers >= 0, at least one")
    every = list(c.overrides) + training  # every run's training overrides
    if item := setting(every, OWNED):
        key = item.split("=", 1)[0]
        raise ConfigError(f"'{item}': compare sets each run's {key} {OWNED[key]}, the same for DiCO and SCST")
    if is_folder(c.xe_checkpoint) and (item := setting(every, FOLDER_KEYS)):
        raise ConfigError(f"'{item}': every run starts from the transformers folder xe_checkpoint="
                          f"{c.xe_checkpoint} (its captioner row and folder)")
    for key in ("dico_config", "scst_config"):
        if not os.path.isfile(getattr(c, key)):
            raise ConfigError(f"bad value for compare key '{key}': '{getattr(c, key)}' does not exist")
    if not c.figure.endswith(".png"):
        raise ConfigError(f"bad value for compare key 'figure': '{c.figure}' is not a .png file")
    # both are written after every run has trained: checked now
    if problem := out_file_problem(c.figure):
        raise ConfigError(f"bad value for compare key 'figure': {problem}")
    if problem := write_problem(c.output_dir):
        raise ConfigError(f"bad value for compare key 'output_dir': '{c.output_dir}' cannot be created or written: "
                          f"{problem}")
    return c, every


def plan(c: CompareConfig, training: list[str], parent_run_id: str = "", resume: bool = False) -> list[dict]:
    """Each run, seed by seed (a stopped compare has whole seeds): name (the method's, with `_seed<s>` when there
    are several seeds), method, seed, stage, label, config file, overrides (compare's first: the run's own win)."""
    runs = []
    for seed in c.seeds:
        for method, stage, label in RUNS if c.scst_cider else RUNS[:2]:
            name = method if len(c.seeds) == 1 else f"{method}_seed{seed}"
            reward = "cider" if method == "scst_cider" else c.reward
            overrides = [*start_overrides(c.xe_checkpoint), f"train.max_steps={c.steps}",
                         f"train.val_every={c.val_every}", f"train.select_best={c.select_best}",
                         # the whole val split (the same images as XE's); --resume: a stopped run continues
                         "train.val_max_images=0", f"train.resume={'auto' if resume else 'none'}",
                         f"train.seed={seed}", f"train.output_dir={os.path.join(c.output_dir, name)}",
                         f"{stage}.reward={reward}", f"tracking.run_name={name}",
                         f"tracking.parent_run_id={parent_run_id}", *stage_overrides(training, stage)]
            runs.append({"name": name, "method": method, "seed": seed, "stage": stage, "label": label,
                         "overrides": overrides, "config": c.dico_config if stage == "dico" else c.scst_config})
    return runs


def is_folder(xe_checkpoint: str) -> bool:
    return os.path.isfile(os.path.join(xe_checkpoint, "config.json"))


def start_overrides(xe_checkpoint: str) -> list[str]:
    """Every run's start: an export's weights (train.init_from), or a transformers folder's, read by the row of its
    architecture as the demo reads its tiny folders (captioner.model and captioner.hf_path; nothing to init from)."""
    path = os.path.abspath(xe_checkpoint)
    if not is_folder(path):
        return [f"train.init_from={path}"]
    from .models.folders import row_reading

    try:
        row = row_reading(path)
    except ConfigError as e:
        raise ConfigError(f"bad value for compare key 'xe_checkpoint': {e}") from None
    return [f"captioner.model={row}", f"captioner.hf_path={path}", "train.init_from="]


def check_start(c: CompareConfig) -> None:
    """The start exists: an export file, or a folder with config.json (a folder without one says so)."""
    if os.path.isdir(c.xe_checkpoint) and not is_folder(c.xe_checkpoint):
        raise ConfigError(f"bad value for compare key 'xe_checkpoint': '{c.xe_checkpoint}' is a folder without "
                          "config.json (neither a model.pt export nor a transformers folder)")
    if not os.path.exists(c.xe_checkpoint):
        raise ConfigError(f"XE checkpoint '{c.xe_checkpoint}' not found (compare key 'xe_checkpoint'; "
                          f"--prepare trains one with the demo's configs)")


def check_start_row(xe_checkpoint: str, cfg) -> None:
    """An export file that cannot be read, or an export or tag trained as another captioner row than the runs train:
    one line now, not the first run's load failing. A start that records no run config is left to that load."""
    if is_folder(xe_checkpoint):
        return
    from .models.weights import check_export_file, recorded_captioner

    if os.path.isfile(xe_checkpoint):  # a file that is no export: now, not in the first run's ranks
        check_export_file(xe_checkpoint, "XE checkpoint (compare key 'xe_checkpoint')")
    if (then := recorded_captioner(xe_checkpoint)) is None:
        return
    row = then.get("model", "builtin")
    if row != cfg.captioner.model:
        raise ConfigError(f"XE checkpoint '{xe_checkpoint}' was trained as captioner.model={row}, the runs train "
                          f"captioner.model={cfg.captioner.model} (set captioner.model and captioner.hf_path for every "
                          "run, or dico_config and scst_config of that row)")


def check_splits(cfg) -> None:
    """Shards of the three splits a compare reads (train, val for the curves, test for the table) exist here, before
    anything trains: the runs' own checks come after their process groups start, the table's after every run. A
    synthetic set is made by the first run."""
    from .data.pipeline import check_local_shards

    if cfg.data.synthetic.enabled:
        return
    for split in ("train", "val", "test"):
        key = f"data.{split}_shards"
        if not (spec := getattr(cfg.data, f"{split}_shards")):
            raise ConfigError(f"{key} is empty: compare trains on train, draws its curves on val and its table on test")
        check_local_shards(spec, key, log_missing=False)


def check_runs(runs: list[dict]):
    """Every run's training config, loaded and validated here (seconds), with a vision-language model's prompt and
    image options against its processor (each once: what the runs' preflight would stop on); the first run's config."""
    cfgs, vlm_inputs = [], set()
    for r in runs:
        try:
            cfgs.append(load_config(r["config"], r["overrides"]))
            check_splits(cfgs[-1])
            c = cfgs[-1].captioner
            if (key := (c.model, c.hf_path, c.prompt, str(c.images_kwargs))) not in vlm_inputs:
                vlm_inputs.add(key)
                check_vlm_input(cfgs[-1])
        except ConfigError as e:
            raise ConfigError(f"run {r['name']}: {e}") from None
        if cfgs[-1].train.stage != r["stage"]:
            raise ConfigError(f"run {r['name']}: {r['config']} is a '{cfgs[-1].train.stage}' config, not {r['stage']}")
    return cfgs[0]


def run_ranks(requested: int | None, cfg) -> int:
    """Each run's ranks: --ranks, or 2 CPU ranks, or every GPU where the runs train on GPUs (their train.device),
    checked against the GPUs torch sees."""
    from .engine import uses_cpu
    from .preflight import check_device

    check_device(cfg)
    if uses_cpu(cfg):
        return requested or 2
    import torch

    gpus = torch.cuda.device_count()
    if requested and requested > gpus:
        raise ConfigError(f"--ranks {requested}: the runs train on GPUs (train.device={cfg.train.device}), one per "
                          f"rank, and torch sees {gpus} here")
    return requested or gpus


def state_file(c: CompareConfig) -> str:
    return os.path.join(c.output_dir, "compare.json")


def earlier_compare(c: CompareConfig, training: list[str]) -> str:
    """--resume: the parent run id of the compare that ran in output_dir with this config; ConfigError when there was
    none, or it ran with other settings (its finished runs would not be this compare's)."""
    path = state_file(c)
    try:
        with open(path) as f:
            then = json.load(f)
        then_id, then_config, then_training = str(then["parent_run_id"]), dict(then["config"]), list(then["training"])
    except FileNotFoundError:
        raise ConfigError(f"--resume: no compare ran in '{c.output_dir}' ({path} is missing)") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"--resume: {path} is not a compare's record (parent_run_id, config, training)") from None
    now = asdict(c)
    changed = [f"{k} {then_config.get(k)!r} -> {now[k]!r}" for k in now if then_config.get(k) != now[k]]
    if then_training != training:
        changed.append(f"training overrides {then_training} -> {training}")
    if changed:
        raise ConfigError(f"--resume: the compare in '{c.output_dir}' ran with other settings ({'; '.join(changed)}); "
                          "resume it with them, or start over without --resume")
    return then_id


# What a training run writes in its train.output_dir (train.py, loop.py, engine.export_weights, supervision's lock,
# the CIDEr reward's document frequencies when the shards' folder is not writable) and evaluate's results beside its
# checkpoints: a run folder holding anything else is not removed
RUN_FILES = re.compile(r"checkpoints|best|hf|config\.yaml|model\.pt|\.lock|.*\.tmp|eval_.*\.json|cider_df-.*\.json")


def check_run_folder(folder: str) -> None:
    """A new compare replaces its runs' folders: only what training runs wrote, never a folder of other files."""
    if not os.path.isdir(folder):
        return
    if other := sorted(n for n in os.listdir(folder) if not RUN_FILES.fullmatch(n)):
        raise ConfigError(f"'{folder}' holds files no training run wrote ({', '.join(other[:3])}), and a new compare "
                          "replaces this run's folder: move them, or choose another output_dir")


def tracking_client(cfg):
    """An MlflowClient of the runs' store (tracking.uri), checked now: the compare's curves are read from it."""
    from mlflow.tracking import MlflowClient

    from .tracking import tracking_uri

    uri = tracking_uri(cfg)
    problem = check_tracking_server(uri, cfg.tracking.connect_timeout_s) or check_sqlite_store(uri)
    try:
        client = MlflowClient(tracking_uri=uri)
        if problem is None:
            client.search_experiments(max_results=1)  # a file that is not a database fails here
    except Exception as e:  # MLflow's and the database's many error types for one cause
        problem = first_line(e)
    if problem:
        raise ConfigError(f"tracking store '{uri}' is unusable: {problem} (compare reads its runs' curves there)")
    return client


def parent_run(client, cfg, c: CompareConfig, training: list[str], resume: bool) -> str:
    """The parent run id in the training runs' store and experiment: a new run, recorded in output_dir, or with
    --resume the earlier compare's, running again."""
    from mlflow.entities import Param

    from .tracking import experiment_id, tracking_uri

    uri = tracking_uri(cfg)
    if resume:
        run_id = earlier_compare(c, training)
        try:
            client.update_run(run_id, status="RUNNING")
        except Exception as e:  # another store, or the run deleted: MLflow's many error types for one cause
            raise ConfigError(f"--resume: the compare's MLflow run {run_id} is not in {uri} "
                              f"({first_line(e)})") from None
        return run_id
    run = client.create_run(experiment_id(client, cfg.tracking.experiment, uri),
                            run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}", tags={"stage": "compare"})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in asdict(c).items()])
    os.makedirs(c.output_dir, exist_ok=True)
    with open(state_file(c) + ".tmp", "w") as f:  # what --resume continues; whole or not at all
        json.dump({"parent_run_id": run.info.run_id, "config": asdict(c), "training": training}, f, indent=1)
    os.replace(state_file(c) + ".tmp", state_file(c))
    return run.info.run_id


def compare(c: CompareConfig, training: list[str], ranks: int | None, resume: bool = False) -> dict:
    from .figure import draw
    from .launch import train_stage
    from .validate import heldout

    cfg = check_runs(plan(c, training))
    ranks = run_ranks(ranks, cfg)
    check_start_row(c.xe_checkpoint, cfg)
    client = tracking_client(cfg)
    if not resume:  # an earlier compare's record and runs go before this one is recorded: --resume never takes them
        folders = [os.path.join(c.output_dir, r["name"]) for r in plan(c, training)]
        for folder in folders:
            check_run_folder(folder)
        if os.path.isfile(state_file(c)):
            os.remove(state_file(c))
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    parent_id = parent_run(client, cfg, c, training, resume)
    try:
        runs = plan(c, training, parent_id, resume)
        for r in runs:
            folder = os.path.join(c.output_dir, r["name"])
            if resume and os.path.isfile(os.path.join(folder, "model.pt")):  # exported last: the run finished
                print(f"\n=== {r['name']}: finished in the earlier compare ({folder}/model.pt)", flush=True)
                continue
            train_stage(r["stage"], ranks, r["overrides"], config=r["config"], prog=PROG, name=r["name"],
                        again="the same command with --resume continues the compare")
        curves = histories(client, parent_id, runs)
        # a folder's weights are those cfg.captioner.hf_path names: no file to load on top
        xe = {"XE": "" if is_folder(c.xe_checkpoint) else c.xe_checkpoint}
        start = heldout(cfg, xe, "val", 0, cfg.train.micro_batch_size)["XE"]["metrics"]
        models = {**xe, **{r["name"]: selected_model(os.path.join(c.output_dir, r["name"])) for r in runs}}
        test = by_method(heldout(cfg, models, "test", c.examples), runs)
        differences = paired(test)
        summary = {"config": asdict(c), "parent_run_id": parent_id, "start": start, "runs": curves, "test": test,
                   "dico_minus": differences, "selected": {**models, "XE": c.xe_checkpoint}}
        os.makedirs(os.path.dirname(os.path.abspath(c.figure)), exist_ok=True)
        seeds = f", {len(c.seeds)} seeds" if len(c.seeds) > 1 else ""
        draw(c.figure, curves, start, test, title=f"DiCO vs SCST from one XE captioner, reward '{c.reward}', "
             f"{c.steps} steps each{seeds}", table="selected checkpoints" + (f", seed {c.seeds[0]}" if seeds else ""))
        path = os.path.join(c.output_dir, "summary.json")
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)
        log_parent(client, parent_id, test, differences, c.figure, path)
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    client.set_terminated(parent_id)
    print_table(test, differences)
    return summary


def prepare(c: CompareConfig, training: list[str], ranks: int) -> None:
    """Trains the demo's chain to XE (evaluator -> xe) when the XE checkpoint is missing."""
    from .launch import train_stage
    from .stages import chain

    if os.path.exists(c.xe_checkpoint):
        return
    for stage in chain("xe"):
        train_stage(stage, ranks, training, prog=PROG)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="compare YAML (configs/demo/compare.yaml); may `extends:` another")
    p.add_argument("--ranks", type=int, default=None, help="ranks per run: CPU processes (default 2), or GPUs where "
                   "the runs' train.device trains on them (default: every GPU)")
    p.add_argument("--prepare", action="store_true", help="train evaluator -> xe first when xe_checkpoint is missing")
    p.add_argument("--resume", action="store_true", help="continue the compare that stopped in output_dir (same "
                   "settings): its finished runs are kept, a stopped one continues its checkpoints, on its MLflow run")
    p.add_argument("overrides", nargs="*", help="key=value: compare keys, or training keys (with a dot) of every run")
    args = p.parse_intermixed_args(argv)  # key=value on either side of a flag (--resume)
    try:
        if args.ranks is not None and args.ranks < 1:
            raise ConfigError(f"--ranks {args.ranks} must be >= 1")
        c, training = load(args.config, args.overrides)
        if os.path.exists(c.xe_checkpoint) or not args.prepare:  # else the runs are checked once it is trained
            check_start(c)
            check_runs(plan(c, training))
        if args.prepare:
            prepare(c, training, args.ranks or 2)  # the demo's configs: CPU ranks
        start = time.time()
        compare(c, training, args.ranks, args.resume)
    except ConfigError as e:
        print(f"{PROG}: config error: {e}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    print(f"\ncompare finished in {time.time() - start:.0f} s; figure: {c.figure}; summary: "
          f"{os.path.join(c.output_dir, 'summary.json')}")
    return exit_codes.OK


if __name__ == "__main__":
    from dico_scale.exit_codes import leave_main

    leave_main(main, "dico_scale.compare")  # without the interpreter's teardown (seconds per process)
