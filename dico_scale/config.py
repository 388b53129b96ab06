"""Typed run configuration: dataclass schema + YAML files (with `extends:`) + dotlist overrides.

Everything here is checked before any process group starts, so a typo costs seconds, not a cluster allocation.
Every problem is raised as ConfigError with a one-line message naming the key.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

STAGES = ("evaluator", "xe", "dico")


class ConfigError(ValueError):
    """A bad config value or file; the message is one line and names the key."""


@dataclass
class SyntheticData:
    enabled: bool = False  # generate the shapes dataset into data.root when it is missing
    seed: int = 0
    n_train: int = 2000
    n_val: int = 100
    n_test: int = 100
    image_size: int = 64
    samples_per_shard: int = 250


@dataclass
class DataConfig:
    root: str = ""  # the synthetic generator writes here; ${data.root} may be used in the shard specs
    train_shards: str = ""  # webdataset spec, e.g. /data/coco/train-{00000..00099}.tar
    val_shards: str = ""
    test_shards: str = ""
    samples_per_epoch: int = 10000  # per epoch over all ranks (resampled training stream)
    shuffle_buffer: int = 500
    num_workers: int = 0
    max_caption_tokens: int = 24  # including BOS and EOS
    # Bad samples and shards are skipped and counted; the run stops (exit 4) when the skipped share of the samples
    # read (all ranks, whole run) passes max_skipped_share, once at least skipped_share_min_samples were read.
    max_skipped_share: float = 0.01  # 1.0 never stops
    skipped_share_min_samples: int = 1000
    synthetic: SyntheticData = field(default_factory=SyntheticData)


@dataclass
class CaptionerConfig:
    image_encoder: str = "ViT-L-14"  # open_clip model name whose visual tower encodes images
    image_encoder_weights: str = ""  # local open_clip / OpenAI-layout checkpoint; empty = random init
    freeze_image_encoder: bool = True
    encoder_layers: int = 3
    decoder_layers: int = 3
    width: int = 512
    heads: int = 8
    dropout: float = 0.1
    max_positions: int = 64  # decoder positions: must cover data.max_caption_tokens and generation.max_len + 1


@dataclass
class EvaluatorConfig:
    model: str = "ViT-B-32-quickgelu"  # open_clip model name
    weights: str = ""  # local file (PAC-S checkpoint, open_clip state dict or DeepSpeed export); empty = random
    metric: str = "pacs"  # pacs: 2.0 * max(cos, 0); clips: 2.5 * max(cos, 0)
    caption_prefix: str = ""  # the official CLIP-S tools prepend "A photo depicts "; the DiCO code does not


@dataclass
class GenerationConfig:
    beam_size: int = 5
    max_len: int = 20  # generated tokens after BOS


@dataclass
class DicoConfig:
    beta: float = 0.2
    tau: float = 300.0
    disable_dropout: bool = True  # as TRL's DPO; the DiCO reference code keeps dropout on


@dataclass
class LossConfig:
    kernel: str = "auto"  # auto: Triton on CUDA, torch on CPU | triton (on CPU only with TRITON_INTERPRET=1) | torch


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (after warmup)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # 0 disables
    grad_accum: int = 1


@dataclass
class TrainConfig:
    stage: str = "xe"
    output_dir: str = "runs/default"
    max_steps: int = 1000  # optimizer steps
    micro_batch_size: int = 16  # images per rank per micro step
    seed: int = 0
    log_every: int = 10
    val_every: int = 0  # 0: validate only at the end
    val_max_images: int = 0  # 0: the whole val split
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    resume: str = "none"  # none | auto | path to a checkpoint tag folder
    init_from: str = ""  # model weights to start from (file written by an earlier stage, or a checkpoint tag)
    max_nonfinite_steps: int = 5  # consecutive non-finite losses before the run stops
    preempt_signal: str = "SIGUSR1"  # on it: checkpoint at the next step, exit with code 3 (empty: ignore signals)
    requeue_on_preempt: bool = True  # under Slurm, rank 0 then runs `scontrol requeue $SLURM_JOB_ID`
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads per rank on CPU; 0 = cores / local ranks


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/../mlflow.db
    experiment: str = "dico-scale"
    run_name: str = ""


@dataclass
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    dico: DicoConfig = field(default_factory=DicoConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    clip_model_configs: str = "configs/clip"  # folder of extra open_clip model JSONs registered offline


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
    cfg = OmegaConf.structured(Config)
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
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _one_line(e, f"override {item}", item.split("=", 1)[0]) from None
    try:
        OmegaConf.resolve(cfg)
        obj: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _one_line(e, path or "defaults") from None
    obj.train.deepspeed_config = resolve_path(obj.train.deepspeed_config)
    obj.clip_model_configs = resolve_path(obj.clip_model_configs)
    validate(obj)
    return obj


REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(p: str) -> str:
    """Relative paths are read from the working directory, else from the repository (configs/ ships there)."""
    if not p or os.path.isabs(p) or os.path.exists(p):
        return p
    alt = REPO_ROOT / p
    return str(alt) if alt.exists() else p


def _check(cond: bool, key: str, msg: str):
    if not cond:
        raise ConfigError(f"bad value for config key '{key}': {msg}")


def validate(c: Config) -> None:
    t, o, d = c.train, c.optim, c.data
    _check(t.stage in STAGES, "train.stage", f"'{t.stage}' is not one of {', '.join(STAGES)}")
    _check(t.device in ("auto", "cpu", "cuda"), "train.device", f"'{t.device}' is not auto, cpu or cuda")
    for key, val in [("train.max_steps", t.max_steps), ("train.micro_batch_size", t.micro_batch_size),
                     ("train.log_every", t.log_every), ("optim.grad_accum", o.grad_accum),
                     ("generation.beam_size", c.generation.beam_size), ("generation.max_len", c.generation.max_len),
                     ("data.samples_per_epoch", d.samples_per_epoch), ("train.max_nonfinite_steps", t.max_nonfinite_steps),
                     ("train.keep_checkpoints", t.keep_checkpoints)]:
        _check(val > 0, key, f"{val} must be > 0")
    for key, val in [("train.val_every", t.val_every), ("train.save_every", t.save_every), ("data.num_workers", d.num_workers),
                     ("optim.warmup_steps", o.warmup_steps), ("optim.weight_decay", o.weight_decay),
                     ("optim.grad_clip", o.grad_clip), ("train.threads", t.threads), ("train.val_max_images", t.val_max_images)]:
        _check(val >= 0, key, f"{val} must be >= 0")
    _check(o.lr > 0, "optim.lr", f"{o.lr} must be > 0")
    _check(0.0 <= d.max_skipped_share <= 1.0, "data.max_skipped_share", f"{d.max_skipped_share} must lie in [0, 1]")
    _check(d.skipped_share_min_samples >= 0, "data.skipped_share_min_samples",
           f"{d.skipped_share_min_samples} must be >= 0")
    _check(d.max_caption_tokens >= 3, "data.max_caption_tokens", f"{d.max_caption_tokens} leaves no room for BOS, a word and EOS")
    _check(o.schedule in ("constant", "cosine"), "optim.schedule", f"'{o.schedule}' is not constant or cosine")
    _check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must lie in [0, 1]")
    _check(c.loss.kernel in ("auto", "triton", "torch"), "loss.kernel", f"'{c.loss.kernel}' is not auto, triton or torch")
    _check(c.evaluator.metric in ("pacs", "clips"), "evaluator.metric", f"'{c.evaluator.metric}' is not pacs or clips")
    _check(c.captioner.width % c.captioner.heads == 0, "captioner.width", "must be divisible by captioner.heads")
    _check(0.0 <= c.captioner.dropout < 1.0, "captioner.dropout", "must lie in [0, 1)")
    _check(c.dico.beta > 0, "dico.beta", "must be > 0")
    _check(c.captioner.max_positions >= max(d.max_caption_tokens, c.generation.max_len + 1), "captioner.max_positions",
           f"{c.captioner.max_positions} < data.max_caption_tokens or generation.max_len + 1")
    if t.stage == "dico":
        _check(c.generation.beam_size >= 2, "generation.beam_size", "dico needs at least 2 candidates per image")
    _check(t.preempt_signal == "" or t.preempt_signal in signal.Signals.__members__, "train.preempt_signal",
           f"'{t.preempt_signal}' is not a signal name such as SIGUSR1")
    _check(t.resume in ("none", "auto") or Path(t.resume).is_dir(), "train.resume",
           f"'{t.resume}' is not none, auto or an existing checkpoint folder")
    if not d.synthetic.enabled:
        _check(bool(d.train_shards), "data.train_shards", "empty (and data.synthetic.enabled is false)")
    for key, val in [("train.init_from", t.init_from), ("evaluator.weights", c.evaluator.weights),
                     ("captioner.image_encoder_weights", c.captioner.image_encoder_weights),
                     ("train.deepspeed_config", t.deepspeed_config)]:
        _check(not val or os.path.exists(val), key, f"'{val}' does not exist")


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
