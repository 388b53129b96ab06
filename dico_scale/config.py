"""Typed run configuration: dataclass schema + YAML files (with `extends:`) + dotlist overrides.

Everything here is checked before any process group starts, so a typo costs seconds, not a cluster allocation.
Every problem is raised as ConfigError with a one-line message naming the key.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError  # also imported from here (`from dico_scale.config import ConfigError`)
from .models import MODELS
from .models.folders import folder_problem
from .rewards import RewardSpecError, parse_reward
from .stages import STAGES, stage_class

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# A frozen model (reference, evaluator) is a DeepSpeed engine without an optimizer: `replicate` (ZeRO stage 0, whole
# on every rank), `shard` (ZeRO-3 partitioned, gathered module by module in its forward), `shard_offload` (ZeRO-3
# with its parameters in CPU memory), `auto` (as the trainable model: shard under ZeRO-3, offloaded when its
# parameters are, else replicate).
PLACEMENTS = ("auto", "replicate", "shard", "shard_offload")


# Ranges of the numeric keys are in the comments ([a, b] closed, (a, b) open); `validate` checks each of them, and
# every float must be finite.

@dataclass
class SyntheticData:
    enabled: bool = False  # generate the shapes dataset into data.root when it is missing
    seed: int = 0  # >= 0
    n_train: int = 2000  # >= 1
    n_val: int = 100  # >= 0
    n_test: int = 100  # >= 0
    image_size: int = 64  # >= 16 (the shapes need room)
    samples_per_shard: int = 250  # >= 1


@dataclass
class DataConfig:
    root: str = ""  # the synthetic generator writes here; ${data.root} may be used in the shard specs
    train_shards: str = ""  # webdataset spec, e.g. /data/coco/train-{00000..00099}.tar
    val_shards: str = ""
    test_shards: str = ""
    samples_per_epoch: int = 10000  # >= 1; per epoch over all ranks (resampled training stream)
    shuffle_buffer: int = 500  # >= 0 (0: no sample shuffle)
    num_workers: int = 0  # >= 0
    max_caption_tokens: int = 24  # >= 3; including BOS and EOS
    # Bad samples and shards are skipped and counted; the run stops (exit 4) when the skipped share of the samples
    # read (all ranks, whole run) passes max_skipped_share, once at least skipped_share_min_samples were read.
    max_skipped_share: float = 0.01  # [0, 1]; 1.0 never stops
    skipped_share_min_samples: int = 1000  # >= 0
    synthetic: SyntheticData = field(default_factory=SyntheticData)


@dataclass
class LoraConfig:
    """LoRA adapters through peft on a Hugging Face row (models/lora.py): only they train."""
    r: int = 0  # >= 0; the adapters' rank, 0 = no LoRA (the weights train, as captioner.freeze says)
    alpha: float = 16.0  # (0, inf); the adapters' output is scaled by alpha / r
    dropout: float = 0.0  # [0, 1); dropout on the adapters' input
    target_modules: str = "q_proj,v_proj"  # comma-separated linear layer names (peft's), or all-linear
    # dico: the reference is the policy with its adapters disabled (no second copy of the weights); true keeps a
    # separate frozen copy instead
    separate_reference: bool = False


@dataclass
class CaptionerConfig:
    model: str = "builtin"  # the captioner architecture: a row of dico_scale.models.MODELS
    hf_path: str = ""  # Hugging Face rows: local save_pretrained folder (weights, tokenizer, image processor)
    freeze: str = "vision"  # Hugging Face rows: frozen parts, comma-separated: vision, projection, embeddings
    prompt: str = "Describe this image in one sentence."  # hf_vlm: the question, inside the folder's chat template
    image_encoder: str = "ViT-L-14"  # open_clip model name whose visual tower encodes images
    image_encoder_weights: str = ""  # local open_clip / OpenAI-layout checkpoint; empty = random init
    freeze_image_encoder: bool = True
    encoder_layers: int = 3  # >= 0 (0: the visual tokens go to the decoder as they are)
    decoder_layers: int = 3  # >= 1
    width: int = 512  # >= 1, a multiple of heads
    heads: int = 8  # >= 1
    dropout: float = 0.1  # [0, 1)
    max_positions: int = 64  # >= 1; decoder positions: must cover data.max_caption_tokens and generation.max_len + 1
    gradient_checkpointing: bool = False  # recompute decoder / encoder (and a trainable tower's) activations in backward
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class EvaluatorConfig:
    model: str = "ViT-B-32-quickgelu"  # open_clip model name
    weights: str = ""  # local file (PAC-S checkpoint, open_clip state dict or DeepSpeed export); empty = random
    metric: str = "pacs"  # pacs: 2.0 * max(cos, 0); clips: 2.5 * max(cos, 0)
    caption_prefix: str = ""  # the official CLIP-S tools prepend "A photo depicts "; the DiCO code does not
    # Where the frozen evaluator's weights live (see PLACEMENTS): auto shards it when the trainable model is ZeRO-3.
    placement: str = "auto"


@dataclass
class GenerationConfig:
    candidates: int = 5  # >= 1 (>= 2 for dico); k per image: beams, or samples (strategy); validation's beam width
    max_len: int = 20  # >= 1; generated tokens after BOS
    strategy: str = "beam"  # beam | sample: how the training stages' rollouts propose candidates
    temperature: float = 1.0  # (0, inf); sampling only
    top_k: int = 0  # >= 0; sampling only, 0 = whole vocabulary


@dataclass
class DicoConfig:
    beta: float = 0.2  # (0, inf): DPO temperature of the implicit reward
    tau: float = 300.0  # [0, inf): sharpness of the loser weights softmax(tau * (r_win - r_loser)); 0 = uniform
    disable_dropout: bool = True  # as TRL's DPO; the DiCO reference code keeps dropout on
    reward_clamp: bool = False  # reward w*max(cos, 0) as CLIP-S / PAC-S; false: w*cos, as the DiCO code
    reference_placement: str = "auto"  # the frozen reference captioner's; see PLACEMENTS
    reward: str = "evaluator"  # evaluator | cider | a weighted sum, e.g. 0.5*evaluator+1.0*cider (rewards/)


@dataclass
class ScstConfig:
    reward: str = "evaluator"  # evaluator | cider | a weighted sum, e.g. 0.5*evaluator+1.0*cider (rewards/)
    candidates: int = 5  # >= 1 (>= 2 for baseline mean); k candidates per image
    strategy: str = "sample"  # sample | beam: how the k candidates are drawn (generation.temperature / top_k apply)
    baseline: str = "mean"  # mean: the image's other k-1 candidates ("new self-critical") | greedy: classic SCST
    average: str = "token"  # token: loss summed over tokens / tokens (self-critical.pytorch) | sequence: mean per caption
    reward_clamp: bool = False  # the evaluator reward w*max(cos, 0); false: w*cos
    disable_dropout: bool = True  # log-probs of the policy that sampled (candidates are drawn in eval mode)


@dataclass
class LossConfig:
    kernel: str = "auto"  # auto: Triton on CUDA, torch on CPU | triton (on CPU only with TRITON_INTERPRET=1) | torch


@dataclass
class OptimConfig:
    lr: float = 1e-4  # (0, inf)
    weight_decay: float = 0.0  # >= 0
    beta1: float = 0.9  # [0, 1)
    beta2: float = 0.999  # [0, 1)
    eps: float = 1e-8  # (0, inf)
    warmup_steps: int = 0  # >= 0
    schedule: str = "constant"  # constant | cosine (after warmup)
    min_lr_ratio: float = 0.0  # [0, 1]; cosine floor as a fraction of lr
    grad_clip: float = 1.0  # >= 0; 0 disables
    grad_accum: int = 1  # >= 1


@dataclass
class TrainConfig:
    stage: str = "xe"
    output_dir: str = "runs/default"
    max_steps: int = 1000  # >= 1; optimizer steps
    micro_batch_size: int = 16  # >= 1; images per rank per micro step
    seed: int = 0  # >= 0
    log_every: int = 10  # >= 1
    val_every: int = 0  # >= 0; 0: validate only at the end
    validate_at_end: bool = True  # false: no validation after the last step (short runs; evaluate the export instead)
    val_max_images: int = 0  # >= 0; 0: the whole val split
    save_every: int = 0  # >= 0; 0: only at the end
    keep_checkpoints: int = 2  # >= 1
    resume: str = "none"  # none | auto | path to a checkpoint tag folder
    init_from: str = ""  # model weights to start from (file written by an earlier stage, or a checkpoint tag)
    max_nonfinite_steps: int = 5  # >= 1; consecutive non-finite losses before the run stops
    preempt_signal: str = "SIGUSR1"  # on it: checkpoint at the next step, exit with code 3 (empty: ignore signals)
    # SIGTERM, and the launcher (deepspeed, torchrun) dying, are handled like preempt_signal; a rank that has not
    # checkpointed and exited stop_timeout_s seconds later exits anyway (exit 1).
    stop_timeout_s: float = 300.0  # (0, inf)
    requeue_on_preempt: bool = True  # under Slurm, rank 0 then runs `scontrol requeue $SLURM_JOB_ID`
    deepspeed_config: str = "configs/deepspeed/zero2.json"  # zero1 | zero2 | zero3 | zero3_offload_optimizer | ...
    # auto: what the DeepSpeed JSON says (bf16 "auto": on a GPU that has it) | fp32 | bf16 | fp16 (dynamic loss
    # scaling; the JSON's fp16 block tunes it). All three models run in it.
    precision: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # >= 0; torch intra-op threads per rank on CPU; 0 = cores / local ranks
    # Best checkpoint: after each validation whose select_best metric improved (a tie does not, nan never does) and
    # that passes select_floor, <output_dir>/best/model.pt and best/best.json are written.
    select_best: str = ""  # empty: off | val/<metric> | val/<metric>:max | val/<metric>:min (default max)
    select_floor: str = ""  # empty: none | val/<metric>>=<number> or val/<metric><=<number>, e.g. val/cider>=0.5
    patience: int = 0  # >= 0; validations without improvement after the best before stopping early (0: never)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/../mlflow.db
    experiment: str = "dico-scale"
    run_name: str = ""
    # An http(s) tracking server is asked for its health before anything is built: a server that does not answer
    # within connect_timeout_s stops the run with one line (exit 2), or, with required=false, disables tracking.
    required: bool = True
    connect_timeout_s: float = 10.0  # (0, inf)
    # Logging never waits for the store: records queue for a sender thread (at most queue_size; more spill to
    # <output_dir>/mlflow_backlog.jsonl, as does whatever the store refuses), retried every retry_every_s.
    queue_size: int = 10000  # >= 1
    retry_every_s: float = 30.0  # (0, inf)
    parent_run_id: str = ""  # the run is created as a child of this MLflow run (tag mlflow.parentRunId; compare)


@dataclass
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    dico: DicoConfig = field(default_factory=DicoConfig)
    scst: ScstConfig = field(default_factory=ScstConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    clip_model_configs: str = "configs/clip"  # folder of extra open_clip model JSONs registered offline


# Renamed keys (old -> new): the old name keeps working for a while, with one warning line per source; the config
# that runs, and the one a checkpoint records, carry the new name.
RENAMED = {"generation.beam_size": "generation.candidates"}  # it counts samples too when strategy=sample
_warned: set[tuple[str, str]] = set()


def _warn_renamed(old: str, new: str, source: str) -> None:
    if (old, source) not in _warned:
        _warned.add((old, source))
        print(f"dico_scale: warning: config key '{old}' is now '{new}' ({source}); the old name will go",
              file=sys.stderr)


def _rename_node(node, source: str) -> None:
    """Renamed keys of a YAML node moved to their new names (the new name wins when a file has both)."""
    for old, new in RENAMED.items():
        (section, key), (new_section, new_key) = old.split("."), new.split(".")
        if isinstance(node.get(section), DictConfig) and key in node[section]:
            _warn_renamed(old, new, source)
            value = node[section].pop(key)
            if new_key not in node.get(new_section, {}):
                OmegaConf.update(node, new, value, force_add=True)


def _rename_override(item: str) -> str:
    key, value = item.split("=", 1)
    if key in RENAMED:
        _warn_renamed(key, RENAMED[key], f"override {item}")
        return f"{RENAMED[key]}={value}"
    return item


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()):
    """A YAML file merged over the file named by its `extends:` key (relative to it)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path}: circular 'extends'")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml scanner errors are multi-line
        raise ConfigError(f"config {path}: invalid YAML ({str(e).splitlines()[0]})") from None
    _rename_node(node, str(path))
    base = node.pop("extends", None)
    if base is None:
        return node
    return OmegaConf.merge(_read_yaml(path.parent / str(base), seen + (path,)), node)


def _one_line(e: OmegaConfBaseException, source: str, fallback_key: str = "") -> ConfigError:
    key = getattr(e, "full_key", None) or fallback_key or "?"
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "not in" in first or "Missing key" in first:
        return ConfigError(f"unknown config key '{key}' ({source})")
    return ConfigError(f"bad value for config key '{key}' ({source}): {first}")


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Schema defaults <- YAML (with extends) <- dotlist overrides, then validation."""
    obj: Config = load_structured(Config, path, overrides)
    obj.train.deepspeed_config = resolve_path(obj.train.deepspeed_config)
    obj.clip_model_configs = resolve_path(obj.clip_model_configs)
    validate(obj)
    return obj


def load_structured(schema, path: str | None, overrides: list[str] = ()):
    """An instance of the dataclass `schema`: its defaults <- YAML (with extends) <- dotlist overrides; an unknown
    key or a wrong type raises ConfigError naming the key."""
    cfg = OmegaConf.structured(schema)
    if path:
        try:
            cfg = OmegaConf.merge(cfg, _read_yaml(Path(path)))
        except OmegaConfBaseException as e:
            raise _one_line(e, path) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value")
        if item.endswith("="):  # `key=` means the empty string (OmegaConf would read null)
            item += "''"
        item = _rename_override(item)
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _one_line(e, f"override {item}", item.split("=", 1)[0]) from None
    try:
        OmegaConf.resolve(cfg)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _one_line(e, path or "defaults") from None


REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(p: str) -> str:
    """Relative paths are read from the working directory, else from the repository (configs/ ships there)."""
    if not p or os.path.isabs(p) or os.path.exists(p):
        return p
    alt = REPO_ROOT / p
    return str(alt) if alt.exists() else p


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


# (key, lowest value, whether the lowest is excluded, highest value or None, whether the highest is excluded)
RANGES = [
    ("data.synthetic.seed", 0, False, None, False), ("data.synthetic.n_train", 1, False, None, False),
    ("data.synthetic.n_val", 0, False, None, False), ("data.synthetic.n_test", 0, False, None, False),
    ("data.synthetic.image_size", 16, False, None, False), ("data.synthetic.samples_per_shard", 1, False, None, False),
    ("data.samples_per_epoch", 1, False, None, False), ("data.shuffle_buffer", 0, False, None, False),
    ("data.num_workers", 0, False, None, False), ("data.max_caption_tokens", 3, False, None, False),
    ("data.max_skipped_share", 0, False, 1, False), ("data.skipped_share_min_samples", 0, False, None, False),
    ("captioner.encoder_layers", 0, False, None, False), ("captioner.decoder_layers", 1, False, None, False),
    ("captioner.width", 1, False, None, False), ("captioner.heads", 1, False, None, False),
    ("captioner.dropout", 0, False, 1, True), ("captioner.max_positions", 1, False, None, False),
    ("captioner.lora.r", 0, False, None, False), ("captioner.lora.alpha", 0, True, None, False),
    ("captioner.lora.dropout", 0, False, 1, True),
    ("generation.candidates", 1, False, None, False), ("generation.max_len", 1, False, None, False),
    ("generation.temperature", 0, True, None, False), ("generation.top_k", 0, False, None, False),
    ("dico.beta", 0, True, None, False), ("dico.tau", 0, False, None, False),
    ("scst.candidates", 1, False, None, False),
    ("optim.lr", 0, True, None, False), ("optim.weight_decay", 0, False, None, False),
    ("optim.beta1", 0, False, 1, True), ("optim.beta2", 0, False, 1, True), ("optim.eps", 0, True, None, False),
    ("optim.warmup_steps", 0, False, None, False), ("optim.min_lr_ratio", 0, False, 1, False),
    ("optim.grad_clip", 0, False, None, False), ("optim.grad_accum", 1, False, None, False),
    ("train.max_steps", 1, False, None, False), ("train.micro_batch_size", 1, False, None, False),
    ("train.seed", 0, False, None, False), ("train.log_every", 1, False, None, False),
    ("train.val_every", 0, False, None, False), ("train.val_max_images", 0, False, None, False),
    ("train.save_every", 0, False, None, False), ("train.keep_checkpoints", 1, False, None, False),
    ("train.max_nonfinite_steps", 1, False, None, False), ("train.stop_timeout_s", 0, True, None, False),
    ("train.threads", 0, False, None, False), ("tracking.connect_timeout_s", 0, True, None, False),
    ("train.patience", 0, False, None, False), ("tracking.queue_size", 1, False, None, False),
    ("tracking.retry_every_s", 0, True, None, False),
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


def read_deepspeed_config(path: str) -> dict:
    """The JSON object of train.deepspeed_config; ConfigError naming the file and the JSON fault."""
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config '{path}': invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except OSError as e:
        raise ConfigError(f"train.deepspeed_config '{path}': cannot read it ({e.strerror or e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed_config '{path}': not a JSON object")
    zero = ds.get("zero_optimization", {})
    declared = zero.get("stage", 0) if isinstance(zero, dict) else None  # the ZeRO stage the JSON asks for
    if declared not in (0, 1, 2, 3):
        raise ConfigError(f"train.deepspeed_config '{path}': zero_optimization.stage {declared!r} is not 0, 1, 2 or 3")
    return ds


def _offloaded(zero: dict, what: str) -> bool:
    block = zero.get(f"offload_{what}") or {}
    return isinstance(block, dict) and block.get("device", "none") not in ("none", None)


def _enabled(ds: dict, name: str):
    block = ds.get(name) or {}
    return block.get("enabled", False) if isinstance(block, dict) else False


def check_deepspeed_combination(c: "Config", ds: dict) -> None:
    """Combinations of the DeepSpeed JSON and the run config that DeepSpeed would refuse (or silently ignore) later,
    on every rank, after minutes of model building: one ConfigError line now instead."""
    path, zero, stage = c.train.deepspeed_config, ds.get("zero_optimization") or {}, zero_stage(ds)
    if _offloaded(zero, "param") and stage != 3:
        raise ConfigError(f"train.deepspeed_config '{path}': zero_optimization.offload_param needs ZeRO stage 3, "
                          f"not {stage}")
    if _offloaded(zero, "optimizer") and stage == 0:
        raise ConfigError(f"train.deepspeed_config '{path}': zero_optimization.offload_optimizer needs ZeRO "
                          "stage 1, 2 or 3")
    if _enabled(ds, "fp16") is True and _enabled(ds, "bf16") is True:
        raise ConfigError(f"train.deepspeed_config '{path}': fp16 and bf16 are both enabled; enable one")
    if "optimizer" in ds or "scheduler" in ds:  # engine.build_engine passes its own AdamW and schedule
        raise ConfigError(f"train.deepspeed_config '{path}': remove its '{'optimizer' if 'optimizer' in ds else 'scheduler'}' "
                          "block: the optimizer and schedule come from the optim.* keys")


def zero_stage(ds: dict) -> int:
    return (ds.get("zero_optimization") or {}).get("stage", 0)


def frozen_placement(placement: str, ds: dict) -> str:
    """`replicate`, `shard` or `shard_offload` for a frozen model (PLACEMENTS), given the trainable model's JSON."""
    if placement != "auto":
        return placement
    zero = ds.get("zero_optimization") or {}
    if zero.get("stage", 0) != 3:
        return "replicate"
    return "shard_offload" if _offloaded(zero, "param") else "shard"


def _validate_captioner(c: Config) -> None:
    """The row exists; Hugging Face rows name a folder that fits them (models/folders.py), the others none."""
    cap = c.captioner
    check(cap.model in MODELS, "captioner.model", f"'{cap.model}' is not one of {', '.join(MODELS)}")
    lora_rows = [name for name, spec in MODELS.items() if spec.lora]
    check(cap.lora.r == 0 or MODELS[cap.model].lora, "captioner.lora.r",
          f"LoRA adapts the rows {', '.join(lora_rows)}, not captioner.model={cap.model}")
    if not MODELS[cap.model].hf:
        check(not cap.hf_path, "captioner.hf_path", f"captioner.model={cap.model} reads no Hugging Face folder")
        return
    check(bool(cap.hf_path), "captioner.hf_path", f"captioner.model={cap.model} reads its weights from a folder")
    needed = max(c.data.max_caption_tokens, c.generation.max_len + 1)
    if problem := folder_problem(cap.model, cap.hf_path, cap.freeze, needed):
        check(False, *problem)


def validate(c: Config) -> None:
    t, o, d = c.train, c.optim, c.data
    check(t.stage in STAGES, "train.stage", f"'{t.stage}' is not one of {', '.join(STAGES)}")
    check(t.device in ("auto", "cpu", "cuda"), "train.device", f"'{t.device}' is not auto, cpu or cuda")
    _floats_finite(c)
    for rng in RANGES:
        _check_range(c, *rng)
    check(o.schedule in ("constant", "cosine"), "optim.schedule", f"'{o.schedule}' is not constant or cosine")
    check(c.loss.kernel in ("auto", "triton", "torch"), "loss.kernel", f"'{c.loss.kernel}' is not auto, triton or torch")
    check(c.generation.strategy in ("beam", "sample"), "generation.strategy",
          f"'{c.generation.strategy}' is not beam or sample")
    check(c.evaluator.metric in ("pacs", "clips"), "evaluator.metric", f"'{c.evaluator.metric}' is not pacs or clips")
    check(t.precision in PRECISIONS, "train.precision", f"'{t.precision}' is not one of {', '.join(PRECISIONS)}")
    check_placement(c.evaluator.placement, "evaluator.placement")
    _validate_captioner(c)
    check(c.captioner.width % c.captioner.heads == 0, "captioner.width", "must be divisible by captioner.heads")
    check(c.captioner.max_positions >= max(d.max_caption_tokens, c.generation.max_len + 1), "captioner.max_positions",
          f"{c.captioner.max_positions} < data.max_caption_tokens or generation.max_len + 1")
    check(t.preempt_signal == "" or t.preempt_signal in signal.Signals.__members__, "train.preempt_signal",
          f"'{t.preempt_signal}' is not a signal name such as SIGUSR1")
    check(t.resume in ("none", "auto") or Path(t.resume).is_dir(), "train.resume",
          f"'{t.resume}' is not none, auto or an existing checkpoint folder")
    check(bool(t.output_dir), "train.output_dir", "empty")
    if t.select_best:
        parse_select_best(t.select_best)
        check(t.val_every > 0, "train.select_best", "needs train.val_every > 0 (with 0 the run validates only at "
              "the end: nothing to select from)")
        check(bool(d.val_shards) if not d.synthetic.enabled else d.synthetic.n_val > 0, "train.select_best",
              "needs a val split (data.val_shards, or data.synthetic.n_val > 0)")
    if t.select_floor:
        check(bool(t.select_best), "train.select_floor", "needs train.select_best")
        parse_select_floor(t.select_floor)
    check(t.patience == 0 or bool(t.select_best), "train.patience",
          f"{t.patience} needs train.select_best (the metric whose improvement it waits for)")
    if not d.synthetic.enabled:
        check(bool(d.train_shards), "data.train_shards", "empty (and data.synthetic.enabled is false)")
    for key, val in [("train.init_from", t.init_from), ("evaluator.weights", c.evaluator.weights),
                     ("captioner.image_encoder_weights", c.captioner.image_encoder_weights),
                     ("train.deepspeed_config", t.deepspeed_config)]:
        check(not val or os.path.exists(val), key, f"'{val}' does not exist")
    for key, val in [("evaluator.weights", c.evaluator.weights),
                     ("captioner.image_encoder_weights", c.captioner.image_encoder_weights)]:
        if val:  # imported only then: the module imports torch, which a config without weight files need not wait for
            from .models.weights import sniff_weights_format  # reads headers only: a wrong kind of file fails here

            sniff_weights_format(val, key)
    check_deepspeed_combination(c, read_deepspeed_config(t.deepspeed_config))
    # Last: the keys only the run's stage reads are checked by its class (stages/), whose import brings torch.
    stage_class(t.stage).check_config(c)


def check_placement(placement: str, key: str) -> None:
    check(placement in PLACEMENTS, key, f"'{placement}' is not one of {', '.join(PLACEMENTS)}")


def check_reward(spec: str, key: str) -> None:
    """A reward spec (dico.reward, scst.reward) that parses, with known names (rewards/)."""
    try:
        parse_reward(spec)
    except RewardSpecError as e:
        check(False, key, f"'{spec}': {e} (want e.g. evaluator, cider or 0.5*evaluator+1.0*cider)")


def to_yaml(c: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(c))


def flatten(c: Config) -> dict[str, str]:
    """Dotted key -> value, for MLflow params."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v
    walk(OmegaConf.to_container(OmegaConf.structured(c)), "")
    return out
