"""A comparison's results (dico_scale.compare): each run's validation curves from its MLflow child run, the
selected checkpoints' held-out metrics per method (the mean and standard deviation over seeds, and each SCST
variant's difference from DiCO paired by seed), the printed table and the parent run's metrics and artifacts."""
from __future__ import annotations

import os
import statistics
import time

from .errors import ConfigError

# (run name, stage, label); the reward of the last is CIDEr-D whatever `reward` says
RUNS = [("dico", "dico", "DiCO"), ("scst", "scst", "SCST"), ("scst_cider", "scst", "SCST (CIDEr-D)")]
CURVES = ["evaluator_score", "cider", "mean_length", "repetition", "vocab_size"]


def histories(client, parent_id: str, runs: list[dict]) -> dict:
    """{label: [{"seed", "run_id", "curves": {metric: [(step, value)]}, "best_step"} per seed]} of the parent's
    child runs."""
    children = client.search_runs([client.get_run(parent_id).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    # a resumed compare: a run stopped before its first checkpoint started again as a new child of the same name; the
    # stopped one, still RUNNING now that every run has finished, is marked KILLED
    by_name = {r.info.run_name: r for r in sorted(children, key=lambda r: r.info.start_time)}
    for r in children:
        if r.info.status == "RUNNING" and by_name[r.info.run_name] is not r:
            client.set_terminated(r.info.run_id, status="KILLED")
    out = {}
    for r in runs:
        child = by_name[r["name"]]
        curves = {m: sorted((h.step, h.value) for h in client.get_metric_history(child.info.run_id, f"val/{m}"))
                  for m in CURVES}
        best = child.data.tags.get("best_step")
        out.setdefault(r["label"], []).append({"seed": r["seed"], "run_id": child.info.run_id, "curves": curves,
                                               "best_step": int(best) if best else None})
    return out


def selected_model(run_dir: str) -> str:
    """A run's selected checkpoint (best/model.pt), or its final model.pt where it selected none (no validation
    passed train.select_floor; said in a line). ConfigError when best/ names a selection whose weights are gone: the
    table would show another step under the selected checkpoints' heading."""
    best = os.path.join(run_dir, "best")
    if os.path.isfile(os.path.join(best, "model.pt")):
        return os.path.join(best, "model.pt")
    if os.path.isfile(os.path.join(best, "best.json")):
        raise ConfigError(f"{best}/best.json names the run's selected checkpoint, but {best}/model.pt is missing: "
                          "train the compare again (without --resume)")
    print(f"{run_dir}: no validation was selected (no {best}/model.pt): the table takes its final model.pt",
          flush=True)
    return os.path.join(run_dir, "model.pt")


def by_method(per_run: dict, runs: list[dict]) -> dict:
    """heldout's {run name: result} as {label: {"metrics": mean over the seeds, "std": sample standard deviation
    (0 for one seed), "seeds": {seed: metrics}, "examples": the first seed's}}; XE as heldout gave it."""
    test = {"XE": dict(per_run["XE"], std={}, seeds={})}
    for r in runs:
        m = test.setdefault(r["label"], {"seeds": {}, "examples": per_run[r["name"]]["examples"]})
        m["seeds"][r["seed"]] = per_run[r["name"]]["metrics"]
    for label, m in list(test.items())[1:]:
        values = {k: [s[k] for s in m["seeds"].values()] for k in next(iter(m["seeds"].values()))}
        m["metrics"] = {k: statistics.fmean(v) for k, v in values.items()}
        m["std"] = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()}
    return test


def paired(test: dict) -> dict:
    """Each other method against DiCO, seed by seed: {label: {metric: {"mean": mean of DiCO - it, "dico_higher":
    seeds where DiCO's is higher, "seeds"}}} for the reward and CIDEr."""
    dico = test["DiCO"]["seeds"]
    out = {}
    for label, m in test.items():
        if label in ("XE", "DiCO"):
            continue
        out[label] = {}
        for k in ("evaluator_score", "cider"):
            diffs = [dico[s][k] - m["seeds"][s][k] for s in dico if k in dico[s] and s in m["seeds"]]
            if diffs:
                out[label][k] = {"mean": statistics.fmean(diffs), "dico_higher": sum(d > 0 for d in diffs),
                                 "seeds": len(diffs)}
    return out


def print_table(test: dict, differences: dict) -> None:
    n = int(next(iter(test.values()))["metrics"]["images"])
    seeds = max(len(m["seeds"]) for m in test.values())
    cell = (lambda m, k, f: f"{m['metrics'][k]:{f}} ± {m['std'].get(k, 0):{f}}") if seeds > 1 else \
        (lambda m, k, f: f"{m['metrics'][k]:{f}}")
    w = 16 if seeds > 1 else 11  # wider than 'repetition', the longest heading
    print(f"\nselected checkpoints on {n} held-out test images" + (f", mean ± std over {seeds} seeds" if seeds > 1
                                                                     else ""))
    print(f"{'model':<16}{'evaluator':>{w}}{'CIDEr':>{w}}{'length':>{w}}{'repetition':>{w}}{'vocab':>{w}}")
    for label, m in test.items():
        m = dict(m, metrics={"evaluator_score": float("nan"), **m["metrics"]})
        formats = (("evaluator_score", ".3f"), ("cider", ".3f"), ("mean_length", ".2f"), ("repetition", ".3f"),
                   ("vocab_size", ".0f"))
        print(f"{label:<16}" + "".join(f"{cell(m, k, f):>{w}}" for k, f in formats))
    for label, diff in differences.items():
        print(f"DiCO - {label}, paired by seed: " + "; ".join(
            f"{k} {d['mean']:+.3f} (DiCO higher on {d['dico_higher']}/{d['seeds']})" for k, d in diff.items()))


def log_parent(client, parent_id: str, test: dict, differences: dict, figure: str, summary: str) -> None:
    """test/<method>/<metric> (the mean over the seeds), with several seeds also .../<metric>_std and
    test/dico_minus_<method>/<metric>; the figure and summary.json as artifacts."""
    import math

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    names = {"XE": "xe", **{label: name for name, _, label in RUNS}}
    values = {f"test/{names[label]}/{k}": v for label, r in test.items() for k, v in r["metrics"].items()}
    if max(len(r["seeds"]) for r in test.values()) > 1:
        values.update({f"test/{names[label]}/{k}_std": v for label, r in test.items() for k, v in r["std"].items()})
        values.update({f"test/dico_minus_{names[label]}/{k}": d["mean"]
                       for label, diff in differences.items() for k, d in diff.items()})
    client.log_batch(parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()
                                         if math.isfinite(float(v))])
    client.log_artifact(parent_id, figure)
    client.log_artifact(parent_id, summary)
