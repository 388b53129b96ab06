"""The checks of a loaded Config, run before any process group starts: every key's range and choices, the files it
names, the rules across keys, the DeepSpeed JSON, then the stage's own keys (its class's check_config). Each fault is
one ConfigError naming the key (`check`), so a typo costs seconds, not a cluster allocation."""
from __future__ import annotations

import math
import os
import re
import signal
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .deepspeed_json import (PLACEMENTS, check_deepspeed_combination, check_trainer_keys,
                             read_deepspeed_config)
from .errors import ConfigError
from .models import MODELS
from .models.folders import folder_problem
from .rewards import RewardSpecError, parse_reward
from .stages import STAGES, stage_class

if TYPE_CHECKING:
    from .config import Config

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # train.precision


def check(cond: bool, key: str, msg: str):
    """ConfigError 'bad value for config key <key>: <msg>' unless cond; the stages' check_config use it too."""
    if not cond:
        raise ConfigError(f"bad value for config key '{key}': {msg}")


def _floats_finite(node, prefix: str = "") -> None:
    """nan and inf parse as floats and pass comparisons that a typo should fail (lr=inf > 0)."""
    for f in fields(node):
        val = getattr(node, f.name)
        if is_dataclass(val):
            _floats_finite(val, f"{prefix}{f.name}.")
        elif isinstance(val, float):
            check(math.isfinite(val), f"{prefix}{f.name}", f"{val} is not a finite number")


DAY = 86400  # seconds: the most a wait may be (Python's timeouts overflow on 1e300; 1e-300 s retries spin)
# (key, lowest value, whether the lowest is excluded, highest value or None, whether the highest is excluded)
RANGES = [
    # the synthetic generator's own bounds (data/synthetic.py), so that a value beyond them fails here
    ("data.synthetic.seed", 0, False, 2**63, True), ("data.synthetic.n_train", 1, False, 10**9, False),
    ("data.synthetic.n_val", 0, False, 10**9, False), ("data.synthetic.n_test", 0, False, 10**9, False),
    ("data.synthetic.image_size", 32, False, 1024, False),
    ("data.synthetic.samples_per_shard", 1, False, 10**9, False),
    ("data.samples_per_epoch", 1, False, None, False), ("data.shuffle_buffer", 0, False, None, False),
    ("data.num_workers", 0, False, None, False), ("data.max_caption_tokens", 3, False, None, False),
    ("data.max_skipped_share", 0, False, 1, False), ("data.skipped_share_min_samples", 0, False, None, False),
    ("captioner.encoder_layers", 0, False, None, False), ("captioner.decoder_layers", 1, False, None, False),
    ("captioner.width", 1, False, None, False), ("captioner.heads", 1, False, None, False),
    ("captioner.dropout", 0, False, 1, True), ("captioner.max_positions", 1, False, None, False),
    ("captioner.lora.r", 0, False, None, False), ("captioner.lora.alpha", 0, True, None, False),
    ("captioner.lora.dropout", 0, False, 1, True),
    ("generation.candidates", 1, False, None, False), ("generation.max_len", 1, False, None, False),
    ("generation.top_k", 0, False, None, False), ("generation.length_penalty", -10, False, 10, False),
    ("generation.repetition_penalty", 0, True, 10, False), ("generation.no_repeat_ngram_size", 0, False, None, False),
    # float32's reach: temperature 1e-40 sampled from inf / inf, beta 1e-39 trained a loss of log 2 with no
    # gradient, beta or tau 1e39 an inf loss
    ("generation.temperature", 1e-4, False, 1e4, False),
    ("dico.beta", 1e-6, False, 1e6, False), ("dico.tau", 0, False, 1e6, False),
    ("scst.candidates", 1, False, None, False),
    ("optim.lr", 0, True, None, False), ("optim.weight_decay", 0, False, None, False),
    ("optim.beta1", 0, False, 1, True), ("optim.beta2", 0, False, 1, True), ("optim.eps", 0, True, None, False),
    ("optim.warmup_steps", 0, False, None, False), ("optim.min_lr_ratio", 0, False, 1, False),
    ("optim.grad_clip", 0, False, None, False), ("optim.grad_accum", 1, False, None, False),
    ("train.max_steps", 1, False, None, False), ("train.micro_batch_size", 1, False, None, False),
    ("train.seed", 0, False, 2**64, True), ("train.log_every", 1, False, None, False),  # torch's seeds: 64 bits
    ("train.val_every", 0, False, None, False), ("train.val_max_images", 0, False, None, False),
    ("train.save_every", 0, False, None, False), ("train.keep_checkpoints", 1, False, None, False),
    ("train.max_nonfinite_steps", 1, False, None, False), ("train.stop_timeout_s", 0, True, DAY, False),
    ("train.threads", 0, False, None, False), ("tracking.connect_timeout_s", 0, True, DAY, False),
    ("train.patience", 0, False, None, False), ("tracking.queue_size", 1, False, None, False),
    ("tracking.retry_every_s", 0.1, False, DAY, False), ("tracking.finish_wait_s", 0, False, DAY, False),
]


SELECT_BEST = re.compile(r"val/([\w./-]+?)(?::(max|min))?")
SELECT_FLOOR = re.compile(r"val/([\w./-]+?)\s*(>=|<=)\s*(\S+)")


def parse_select_best(spec: str) -> tuple[str, str]:
    """train.select_best -> (metric name without 'val/', 'max' or 'min')."""
    m = SELECT_BEST.fullmatch(spec.strip())
    check(m is not None, "train.select_best", f"'{spec}' is not val/<metric>, val/<metric>:max or val/<metric>:min")
    return m.group(1), m.group(2) or "max"


def parse_select_floor(spec: str) -> tuple[str, str, float]:
    """train.select_floor -> (metric name without 'val/', '>=' or '<=', bound)."""
    m = SELECT_FLOOR.fullmatch(spec.strip())
    try:
        bound = float(m.group(3)) if m else math.nan
    except ValueError:
        bound = math.nan
    check(m is not None and math.isfinite(bound), "train.select_floor",
          f"'{spec}' is not val/<metric>>=<number> or val/<metric><=<number>")
    return m.group(1), m.group(2), bound


def _get(c: Config, key: str):
    for part in key.split("."):
        c = getattr(c, part)
    return c


def _check_range(c: Config, key: str, lo, lo_open: bool, hi, hi_open: bool) -> None:
    val = _get(c, key)
    if lo_open or hi is not None:
        ok = (val > lo if lo_open else val >= lo) and (hi is None or (val < hi if hi_open else val <= hi))
        want = f"in {'(' if lo_open else '['}{lo}, {'inf)' if hi is None else f'{hi}' + (')' if hi_open else ']')}"
        check(ok, key, f"{val} must lie {want}")
    else:
        check(val >= lo, key, f"{val} must be >= {lo}")


def _validate_captioner(c: Config) -> None:
    """The row exists; Hugging Face rows name a folder that fits them (models/folders.py), the others none."""
    cap = c.captioner
    check(cap.model in MODELS, "captioner.model", f"'{cap.model}' is not one of {', '.join(MODELS)}")
    lora_rows = [name for name, spec in MODELS.items() if spec.lora]
    check(cap.lora.r == 0 or MODELS[cap.model].lora, "captioner.lora.r",
          f"LoRA adapts the rows {', '.join(lora_rows)}, not captioner.model={cap.model}")
    check(cap.lora.r > 0 or not cap.lora.modules_to_save.strip(), "captioner.lora.modules_to_save",
          "trains modules whole beside LoRA adapters (captioner.lora.r > 0); without LoRA, captioner.freeze says what "
          "trains")
    check(cap.lora.r == 0 or bool(cap.lora.target_modules.replace(",", "").strip()), "captioner.lora.target_modules",
          "names no layer (layer names, comma-separated or a YAML list, or all-linear)")
    for key in ("prompt", "freeze"):  # a row's setting, silently ignored by the rows that do not read it
        readers = [name for name, spec in MODELS.items() if key in spec.keys]
        check(getattr(cap, key) == getattr(type(cap), key) or cap.model in readers, f"captioner.{key}",
              f"read by the rows {', '.join(readers)}, not captioner.model={cap.model}")
    check(not cap.images_kwargs or cap.model == "hf_vlm", "captioner.images_kwargs",
          f"options of a vision-language model's processor (hf_vlm), not captioner.model={cap.model}")
    attn_rows = [name for name, spec in MODELS.items() if "attn_implementation" in spec.keys]
    check(not cap.attn_implementation or cap.model in attn_rows, "captioner.attn_implementation",
          f"sets the attention of a transformers row ({', '.join(attn_rows)}), not captioner.model={cap.model}")
    if not MODELS[cap.model].hf:
        check(not cap.hf_path, "captioner.hf_path", f"captioner.model={cap.model} reads no Hugging Face folder")
        return
    check(bool(cap.hf_path), "captioner.hf_path", f"captioner.model={cap.model} reads its weights from a folder")
    needed = max(c.data.max_caption_tokens, c.generation.max_len + 1)
    if problem := folder_problem(cap.model, cap.hf_path, cap.freeze, needed):
        check(False, *problem)


PATH_KEYS = ("data.root", "data.train_shards", "data.val_shards", "data.test_shards", "captioner.hf_path",
             "captioner.image_encoder_weights", "evaluator.weights", "train.output_dir", "train.resume",
             "train.init_from", "train.deepspeed_config", "tracking.uri", "clip_model_configs")


def _check_no_tilde(c: Config) -> None:
    """'~/runs' in YAML or a quoted override reaches us as is: the run wrote a folder named '~' in the working
    directory (one `rm -rf ~` away from the home folder). Only a shell expands it."""
    for key in PATH_KEYS:
        value = str(_get(c, key))
        check(not (value.startswith("~") or value.startswith("sqlite:///~")), key,
              f"'{value}': nothing here expands '~' (a shell does, unquoted, at a word's start): write the path out, "
              f"e.g. {os.path.expanduser('~')}/...")


def read_problem(path: str) -> str | None:
    """Why a file or folder cannot be read, in words ('does not exist', 'cannot be read (Permission denied)'); None
    when it can. A folder above it without search permission hides it: 'cannot be reached', not 'does not exist'."""
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            open(path, "rb").close()
    except FileNotFoundError:
        return "does not exist"
    except PermissionError as e:
        return f"cannot be {'read' if os.path.lexists(path) else 'reached'} ({e.strerror})"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return None


def validate(c: Config, training: bool = True) -> None:
    t, o, d = c.train, c.optim, c.data
    check(t.stage in STAGES, "train.stage", f"'{t.stage}' is not one of {', '.join(STAGES)}")
    _check_no_tilde(c)
    check(t.device in ("auto", "cpu", "cuda"), "train.device", f"'{t.device}' is not auto, cpu or cuda")
    _floats_finite(c)
    for rng in RANGES:
        _check_range(c, *rng)
    check(o.schedule in ("constant", "cosine"), "optim.schedule", f"'{o.schedule}' is not constant or cosine")
    check(c.loss.kernel in ("auto", "triton", "torch"), "loss.kernel", f"'{c.loss.kernel}' is not auto, triton or torch")
    check(c.generation.strategy in ("beam", "sample"), "generation.strategy",
          f"'{c.generation.strategy}' is not beam or sample")
    check(c.generation.early_stopping.lower() in ("false", "true", "never"), "generation.early_stopping",
          f"'{c.generation.early_stopping}' is not false, true or never (transformers' early_stopping)")
    check(c.evaluator.metric in ("pacs", "clips"), "evaluator.metric", f"'{c.evaluator.metric}' is not pacs or clips")
    check(t.precision in PRECISIONS, "train.precision", f"'{t.precision}' is not one of {', '.join(PRECISIONS)}")
    check_placement(c.evaluator.placement, "evaluator.placement")
    _validate_captioner(c)
    check(c.captioner.width % c.captioner.heads == 0, "captioner.width", "must be divisible by captioner.heads")
    check(c.captioner.max_positions >= max(d.max_caption_tokens, c.generation.max_len + 1), "captioner.max_positions",
          f"{c.captioner.max_positions} < data.max_caption_tokens or generation.max_len + 1")
    check(t.preempt_signal == "" or t.preempt_signal in signal.Signals.__members__, "train.preempt_signal",
          f"'{t.preempt_signal}' is not a signal name such as SIGUSR1")
    # SIGKILL and SIGSTOP cannot be caught; SIGCHLD comes whenever a child (a data worker) exits
    check(t.preempt_signal not in ("SIGKILL", "SIGSTOP", "SIGCHLD"), "train.preempt_signal",
          f"{t.preempt_signal} cannot be a preemption signal (it cannot be caught, or every exiting child sends it)")
    check(t.resume in ("none", "auto") or Path(t.resume).is_dir(), "train.resume",
          f"'{t.resume}' is not none, auto or an existing checkpoint folder")
    check(bool(t.output_dir), "train.output_dir", "empty")
    check(bool(c.tracking.experiment.strip()) or not c.tracking.enabled, "tracking.experiment",
          "empty (MLflow needs a name; tracking.enabled=false trains without tracking)")
    if t.select_best:
        parse_select_best(t.select_best)
        check(t.val_every > 0, "train.select_best", "needs train.val_every > 0 (with 0 the run validates only at "
              "the end: nothing to select from)")
        check(has_val_split(c), "train.select_best", "needs a val split (data.val_shards, or data.synthetic.n_val > 0)")
    if t.select_floor:
        check(bool(t.select_best), "train.select_floor", "needs train.select_best")
        parse_select_floor(t.select_floor)
    check(t.patience == 0 or bool(t.select_best), "train.patience",
          f"{t.patience} needs train.select_best (the metric whose improvement it waits for)")
    if training and not d.synthetic.enabled:
        check(bool(d.train_shards), "data.train_shards", "empty (and data.synthetic.enabled is false)")
    for split in ("train", "val", "test"):  # the synthetic set replaces every split: a shard spec would be ignored
        check(not (d.synthetic.enabled and getattr(d, f"{split}_shards")), f"data.{split}_shards",
              "set while data.synthetic.enabled=true, which trains and validates on the generated set instead: set "
              "data.synthetic.enabled=false to read the shards")
    # a row that does not read the built-in's tower file (a Hugging Face row: its folder's) leaves it unchecked, as
    # configs that extend the demo's and switch the row carry it
    tower = c.captioner.image_encoder_weights if "image_encoder_weights" in MODELS[c.captioner.model].keys else ""
    for key, val in [("train.init_from", t.init_from), ("evaluator.weights", c.evaluator.weights),
                     ("captioner.image_encoder_weights", tower), ("train.deepspeed_config", t.deepspeed_config)]:
        problem = read_problem(val) if val else None
        check(problem is None, key, f"'{val}' {problem}")
    if os.path.isdir(t.init_from):  # imported only then, as below
        from .models.weights import tag_folder_problem

        check(not (problem := tag_folder_problem(t.init_from)), "train.init_from", f"'{t.init_from}' is {problem}")
    for key, val in [("evaluator.weights", c.evaluator.weights), ("captioner.image_encoder_weights", tower)]:
        if val:  # imported only then: the module imports torch, which a config without weight files need not wait for
            from .models.clip_weights import sniff_weights_format  # reads headers only: a wrong kind of file fails here

            sniff_weights_format(val, key)
    ds = read_deepspeed_config(t.deepspeed_config)
    check_deepspeed_combination(t.deepspeed_config, ds)
    check_trainer_keys(t.deepspeed_config, ds, t.device)
    # Last: the keys only the run's stage reads are checked by its class (stages/), whose import brings torch.
    stage = stage_class(t.stage)
    stage.check_config(c)
    check_selected_metrics(c, stage.validation_metrics(c))


def unread_settings(c: Config) -> list[tuple[str, list[str]]]:
    """(the choice, the keys set away from their defaults that it leaves unread): another stage's section, LoRA's
    options without LoRA, the cosine floor under a constant schedule, sampling's options where nothing samples,
    train.val_every where there is no val split."""
    default, out = type(c)(), []  # the schema's defaults
    groups = [(f"train.stage={c.train.stage}", spec.section) for spec in STAGES.values()
              if spec.section and spec.name != c.train.stage]
    groups.append(("captioner.lora.r=0", "captioner.lora") if not c.captioner.lora.r else None)
    for choice, section in filter(None, groups):
        ours, theirs = _get(c, section), _get(default, section)
        if changed := [f"{section}.{f.name}" for f in fields(ours) if getattr(ours, f.name) != getattr(theirs, f.name)]:
            out.append((choice, changed))
    if c.optim.schedule == "constant" and c.optim.min_lr_ratio != default.optim.min_lr_ratio:
        out.append(("optim.schedule=constant", ["optim.min_lr_ratio"]))
    if not has_val_split(c) and c.train.val_every > 0:  # validations asked for (its val_max_images may be a base's)
        out.append(("data.synthetic.n_val=0" if c.data.synthetic.enabled else "data.val_shards=''",
                    ["train.val_every"]))
    choice, unread = _rollout_choice(c)
    if changed := [k for k in unread if _get(c, k) != _get(default, k)]:
        out.append((choice, changed))
    return out


def has_val_split(c: Config) -> bool:
    d = c.data
    return bool(d.val_shards) if not d.synthetic.enabled else d.synthetic.n_val > 0


def _rollout_choice(c: Config) -> tuple[str, list[str]]:
    """(the choice, the generation keys it leaves unread): generation.strategy draws only a dico rollout's candidates
    (scst has scst.strategy), and temperature and top_k shape only sampled ones; validation always searches beams."""
    stage = c.train.stage
    key = {"dico": "generation.strategy", "scst": "scst.strategy"}.get(stage)
    unread = [] if stage == "dico" else ["generation.strategy"]
    if key is None or _get(c, key) != "sample":
        unread += ["generation.temperature", "generation.top_k"]
    return (f"train.stage={stage}" + (f" with {key}={_get(c, key)}" if key and _get(c, key) != "sample" else ""),
            unread)


def warn_unread_settings(c: Config) -> None:
    """One warning line per choice that leaves set keys unread (a setting is never ignored unsaid), from one rank of
    the trainer (compare and the demo load run configs too: their children say it)."""
    if os.environ.get("RANK", "0") != "0":
        return
    for choice, keys in unread_settings(c):
        print(f"dico_scale: warning: {', '.join(keys)} {'is' if len(keys) == 1 else 'are'} set, but {choice} reads "
              f"{'it' if len(keys) == 1 else 'them'} nowhere: {'it does' if len(keys) == 1 else 'they do'} nothing "
              "in this run", file=sys.stderr, flush=True)


def check_selected_metrics(c: Config, logged: set[str] | None) -> None:
    """train.select_best and select_floor name a metric the stage's validation logs (where the stage says which):
    else the run would stop at its first validation, after its first steps."""
    t = c.train
    for key, spec, parse in (("train.select_best", t.select_best, parse_select_best),
                             ("train.select_floor", t.select_floor, parse_select_floor)):
        if spec and logged is not None and (metric := parse(spec)[0]) not in logged:
            hint = "; evaluator.weights adds val/evaluator_score" if metric == "evaluator_score" else ""
            check(False, key, f"'{spec}': the {t.stage} stage's validation logs no val/{metric} here (it logs "
                              f"{', '.join(f'val/{m}' for m in sorted(logged))}{hint})")


def check_placement(placement: str, key: str) -> None:
    check(placement in PLACEMENTS, key, f"'{placement}' is not one of {', '.join(PLACEMENTS)}")


def check_reward(spec: str, key: str) -> None:
    """A reward spec (dico.reward, scst.reward) that parses, with known names (rewards/)."""
    try:
        parse_reward(spec)
    except RewardSpecError as e:
        check(False, key, f"'{spec}': {e} (want e.g. evaluator, cider or 0.5*evaluator+1.0*cider)")
