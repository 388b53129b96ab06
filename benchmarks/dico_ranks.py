"""DiCO training throughput per captioner row on CPU ranks, through the real trainer: dico_scale/train.py under
torchrun (ZeRO-2 over gloo), random weights, the demo's synthetic data. The rows run in turn, `--rounds`
times over, so that load from other processes falls on all of them alike; images/s is the run's own
`train/images_per_s` (all ranks' images over the wall time between two log points), read back from its MLflow store,
after `--warmup` logged steps. benchmarks/dico_step.py splits one process's step into phases; this is the whole step
with the ranks' communication in it.

    python benchmarks/dico_ranks.py --captioners builtin,vit-gpt2,blip,dico_ref --ranks 2 --steps 8 --rounds 2
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile

from dico_scale.demo import CAPTIONER_FAMILIES, captioner_overrides
from dico_scale.errors import OneLineParser
from dico_scale.launch import train_stage
from dico_scale.preflight import out_file_problem


def row_overrides(workdir: str, captioner: str, ranks: int, batch: int, steps: int, name: str) -> list[str]:
    """One row's run: every step logged, no validation, no checkpoint, its own output folder."""
    return [f"data.root={workdir}/data", f"tracking.uri=sqlite:///{workdir}/mlflow.db", f"tracking.run_name={name}",
            "data.synthetic.n_train=200", "data.synthetic.n_val=8", "data.synthetic.n_test=8",
            "data.synthetic.samples_per_shard=50", f"data.samples_per_epoch={max(64, 2 * ranks * batch * steps)}",
            "train.init_from=", "evaluator.weights=", "captioner.image_encoder_weights=",
            f"train.micro_batch_size={batch}", f"train.max_steps={steps}", "train.log_every=1", "train.val_every=0",
            f"train.save_every={steps + 1}", f"train.output_dir={workdir}/runs/{name}",
            *captioner_overrides(captioner, f"{workdir}/models", vocab_size=49409)]


PHASES = ("generate", "reward", "policy", "reference", "backward")  # the trainer's time/<phase>_s metrics


def logged(db: str, run_name: str, warmup: int) -> dict[str, list[float]]:
    """train/images_per_s and the phases' seconds of each logged step after the first `warmup`, from the run named
    run_name (means over the ranks, as the trainer logs them)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"attributes.run_name = '{run_name}'")
    if len(runs) != 1:
        raise SystemExit(f"dico_ranks: expected one run named {run_name} in {db}, found {len(runs)}")
    out = {}
    for key in ("train/images_per_s", *(f"time/{p}_s" for p in PHASES)):
        history = sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: m.step)
        out[key] = [m.value for m in history if m.step > warmup]
    return out


def main(argv=None) -> int:
    p = OneLineParser(prog="dico_ranks.py", description=__doc__.split("\n\n")[0])  # a bad argument: one line
    p.add_argument("--captioners", default="builtin,vit-gpt2", help="comma-separated dico_scale.demo --captioner names")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="images per rank and step (x generation.candidates)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="logged steps left out of the median")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", help="default: a temporary folder")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("overrides", nargs="*", help="config key=value overrides for every run")
    a = p.parse_args(argv)
    for flag, least in (("ranks", 1), ("batch", 1), ("rounds", 1), ("warmup", 0)):  # ZeroDivisionError otherwise
        if getattr(a, flag) < least:
            p.error(f"--{flag} {getattr(a, flag)} must be at least {least}")
    if a.steps <= a.warmup:
        p.error(f"--steps {a.steps} must be more than --warmup {a.warmup}")
    rows = a.captioners.split(",")
    unknown = [c for c in rows if c not in ("builtin", *CAPTIONER_FAMILIES)]
    if unknown:
        p.error(f"--captioners: {', '.join(unknown)} not among builtin, {', '.join(CAPTIONER_FAMILIES)}")
    if a.json and (problem := out_file_problem(a.json)):  # before the runs, not after them
        p.error(f"--json {problem}")
    workdir = os.path.abspath(a.workdir or tempfile.mkdtemp(prefix="dico_ranks-"))
    per_round: dict[str, list[float]] = {c: [] for c in rows}
    samples: dict[str, dict[str, list[float]]] = {c: {} for c in rows}
    for r in range(a.rounds):
        for c in rows:
            name = f"{c}-round{r}"
            train_stage("dico", a.ranks, row_overrides(workdir, c, a.ranks, a.batch, a.steps, name) + a.overrides,
                        prog="dico_ranks", name=name)
            for key, values in logged(f"{workdir}/mlflow.db", name, a.warmup).items():
                samples[c].setdefault(key, []).extend(values)
                if key == "train/images_per_s":
                    per_round[c].append(statistics.median(values))
    base = statistics.median(samples[rows[0]]["train/images_per_s"])
    print(f"\n{a.ranks} CPU ranks, {a.batch} images per rank and step, {a.steps - a.warmup} steps timed after "
          f"{a.warmup} in each of {a.rounds} rounds, rows in turn; workdir {workdir}. Phase shares: of the phases' "
          "median seconds summed (the rest of a step is the loss, data and logging)")
    print(f"| captioner | images/s (median of all timed steps) | per round | vs {rows[0]} | phase shares |")
    print("|---|---|---|---|---|")
    result = []
    for c in rows:
        med = statistics.median(samples[c]["train/images_per_s"])
        seconds = {p: statistics.median(samples[c][f"time/{p}_s"]) for p in PHASES}
        shares = {p: v / sum(seconds.values()) for p, v in seconds.items()}
        result.append({"captioner": c, "images_per_s": med, "per_round": per_round[c], "vs_first": med / base,
                       "phase_seconds": seconds, "phase_shares": shares})
        print(f"| {c} | {med:.2f} | {', '.join(f'{v:.2f}' for v in per_round[c])} | {med / base:.2f}x | "
              + ", ".join(f"{p} {v:.0%}" for p, v in shares.items()) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"ranks": a.ranks, "batch": a.batch, "steps": a.steps, "warmup": a.warmup,
                       "rounds": a.rounds, "rows": result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
