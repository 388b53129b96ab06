"""Typed run configuration: dataclass schema + YAML files (with `extends:`) + dotlist overrides.

load_config checks the result before any process group starts (checks.py), so a typo costs seconds, not a cluster
allocation. Every problem is raised as ConfigError with a one-line message naming the key.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .checks import validate
from .errors import ConfigError  # also imported from here (`from dico_scale.config import ConfigError`)

# Ranges of the numeric keys are in the comments ([a, b] closed, (a, b) open); checks.validate checks each of them
# (checks.RANGES), and every float must be finite.


@dataclass
class SyntheticData:
    enabled: bool = False  # generate the shapes dataset into data.root when it is missing
    seed: int = 0  # [0, 2**63)
    n_train: int = 2000  # [1, 10**9]
    n_val: int = 100  # [0, 10**9]
    n_test: int = 100  # [0, 10**9]
    image_size: int = 64  # [32, 1024] (the shapes need room)
    samples_per_shard: int = 250  # [1, 10**9]


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
    """LoRA adapters through peft on a Hugging Face row (models/lora.py): only they (and modules_to_save) train."""
    r: int = 0  # >= 0; the adapters' rank, 0 = no LoRA (the weights train, as captioner.freeze says)
    alpha: float = 16.0  # (0, inf); the adapters' output is scaled by alpha / r
    dropout: float = 0.0  # [0, 1); dropout on the adapters' input
    target_modules: str = "q_proj,v_proj"  # comma-separated or a YAML list: linear layer names (peft's), or all-linear
    # comma-separated or a YAML list: module names (peft's modules_to_save, e.g. connector, multi_modal_projector)
    # trained whole beside the adapters; their starting copy stays for the adapter-disabled reference. Empty: only
    # the adapters train
    modules_to_save: str = ""
    # dico: the reference is the policy with its adapters disabled (no second copy of the weights); true keeps a
    # separate frozen copy instead
    separate_reference: bool = False


@dataclass
class CaptionerConfig:
    model: str = "builtin"  # the captioner architecture: a row of dico_scale.models.MODELS
    hf_path: str = ""  # Hugging Face rows: local save_pretrained folder (weights, tokenizer, image processor)
    freeze: str = "vision"  # Hugging Face rows: frozen parts, comma-separated: vision, projection, embeddings
    prompt: str = "Describe this image in one sentence."  # hf_vlm: the question, inside the folder's chat template
    # hf_vlm: options of the processor's image call, e.g. size (Qwen-VL's pixel bounds), do_pan_and_scan (Gemma 3),
    # do_image_splitting (SmolVLM), max_patches (InternVL): how many image tokens a picture becomes
    images_kwargs: Dict[str, Any] = field(default_factory=dict)
    # Hugging Face rows: transformers' attention (eager, sdpa, flex_attention, flash_attention_2, ...: the names
    # from_pretrained takes); empty = transformers' choice (sdpa where the model has it, else eager)
    attn_implementation: str = ""
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
    # Where the frozen evaluator's weights live (deepspeed_json.PLACEMENTS): auto shards it when the trainable model is ZeRO-3.
    placement: str = "auto"


@dataclass
class GenerationConfig:
    candidates: int = 5  # >= 1 (>= 2 for dico); k per image: beams, or samples (strategy); validation's beam width
    max_len: int = 20  # >= 1; generated tokens after BOS
    strategy: str = "beam"  # beam | sample: how the training stages' rollouts propose candidates
    temperature: float = 1.0  # [1e-4, 1e4]; sampling only
    top_k: int = 0  # >= 0; sampling only, 0 = whole vocabulary
    length_penalty: float = 1.0  # [-10, 10]; beam: ended beams rank by log-prob sum / length ** this (generate's)
    early_stopping: str = "false"  # false | true | never; beam: when the search stops before max_len (generate's)
    repetition_penalty: float = 1.0  # (0, 10]; beam: log-probs of tokens already in the prompt or caption x this
    no_repeat_ngram_size: int = 0  # >= 0; beam: no n-gram of this size twice in prompt + caption, 0 = off (generate's)


@dataclass
class DicoConfig:
    beta: float = 0.2  # [1e-6, 1e6]: DPO temperature of the implicit reward
    tau: float = 300.0  # [0, 1e6]: sharpness of the loser weights softmax(tau * (r_win - r_loser)); 0 = uniform
    disable_dropout: bool = True  # as TRL's DPO; the DiCO reference code keeps dropout on
    reward_clamp: bool = False  # reward w*max(cos, 0) as CLIP-S / PAC-S; false: w*cos, as the DiCO code
    reference_placement: str = "auto"  # the frozen reference captioner's; see deepspeed_json.PLACEMENTS
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
    seed: int = 0  # [0, 2**64): torch's seeds are 64 bits
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
    stop_timeout_s: float = 300.0  # (0, 86400]
    requeue_on_preempt: bool = True  # under Slurm, rank 0 then runs `scontrol requeue $SLURM_JOB_ID`
    deepspeed_config: str = "configs/deepspeed/zero2.json"  # zero1 | zero2 | zero3 | zero3_offload_optimizer | ...
    # auto: what the DeepSpeed JSON says (bf16 "auto": on a GPU that has it) | fp32 | bf16 | fp16 (dynamic loss
    # scaling; the JSON's fp16 block tunes it). All three models run in it.
    precision: str = "auto"
    device: str = "auto"  # auto (CUDA when torch sees it) | cpu | cuda (an error without it)
    # torch intra-op threads per rank on CPU; 0: $OMP_NUM_THREADS where set, else the process's cores (its
    # affinity) / local ranks
    threads: int = 0  # >= 0
    # Best checkpoint: after each validation whose select_best metric improved (a tie does not, nan never does) and
    # that passes select_floor, <output_dir>/best/model.pt and best/best.json are written.
    select_best: str = ""  # empty: off | val/<metric> | val/<metric>:max | val/<metric>:min (default max)
    select_floor: str = ""  # empty: none | val/<metric>>=<number> or val/<metric><=<number>, e.g. val/cider>=0.5
    patience: int = 0  # >= 0; validations without improvement after the best before stopping early (0: never)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    experiment: str = "dico-scale"
    run_name: str = ""
    # An http(s) tracking server is asked for its health before anything is built: a server that does not answer
    # within connect_timeout_s stops the run with one line (exit 2), or, with required=false, disables tracking.
    required: bool = True
    connect_timeout_s: float = 10.0  # (0, 86400]
    # Logging never waits for the store: records queue for a sender thread (at most queue_size; more spill to
    # <output_dir>/mlflow_backlog.jsonl, as does whatever the store refuses), retried every retry_every_s.
    queue_size: int = 10000  # >= 1
    retry_every_s: float = 30.0  # [0.1, 86400]
    # At the end the sender gets this long to send what is queued; the rest goes to the backlog. A hung server
    # holds the run's exit (and a preempted job's grace period) no longer than this.
    finish_wait_s: float = 15.0  # [0, 86400]
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


# keys that hold comma-separated names (peft's own configs give them as lists): a YAML list of strings is joined
NAME_LISTS = ("captioner.lora.target_modules", "captioner.lora.modules_to_save")


def _join_name_lists(node: DictConfig, source: str) -> None:
    for key in NAME_LISTS:
        value = OmegaConf.select(node, key, throw_on_missing=False)
        if isinstance(value, ListConfig):
            if not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"bad value for config key '{key}' ({source}): {list(value)} is not a list of names")
            OmegaConf.update(node, key, ",".join(value), merge=False)


def override_key(item: str) -> str:
    """The key a key=value override sets."""
    return item.split("=", 1)[0].strip()


def setting(overrides, keys) -> str | None:
    """The first override that sets one of `keys` (keys its caller sets itself, per run or stage), or None."""
    return next((item for item in overrides if override_key(item) in keys), None)


def _rename_override(item: str) -> str:
    key, value = item.split("=", 1)
    if key in RENAMED:
        _warn_renamed(key, RENAMED[key], f"override {item}")
        return f"{RENAMED[key]}={value}"
    return item


def _read_yaml(path: Path, schema: DictConfig, seen: tuple[Path, ...] = ()):
    """A YAML file merged over the file named by its `extends:` key (relative to it), each file's sections checked
    against `schema` (the structured defaults)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path}: circular 'extends'")
    if path.is_dir():
        raise ConfigError(f"config {path} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml scanner errors are multi-line
        raise ConfigError(f"config {path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config {path}: the top level is a list, not a mapping of keys (train:, data:, ...)")
    _rename_node(node, str(path))
    _join_name_lists(node, str(path))
    base = node.pop("extends", None)
    _check_sections(schema, node, str(path))
    if base is None:
        return node
    return OmegaConf.merge(_read_yaml(path.parent / str(base), schema, seen + (path,)), node)


def _one_line(e: OmegaConfBaseException, source: str, fallback_key: str = "") -> ConfigError:
    key = getattr(e, "full_key", None) or fallback_key or "?"
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "not in" in first or "Missing key" in first:
        return ConfigError(f"unknown config key '{key}' ({source})")
    if first.startswith("Merge error") and "is not a subclass of" in first:  # an override `train=5`
        return ConfigError(f"config key '{key}' is a section of keys ({key}.<key>=...), not a value ({source})")
    return ConfigError(f"bad value for config key '{key}' ({source}): {first}")


def _check_sections(schema: DictConfig, node: DictConfig, source: str, prefix: str = "") -> None:
    """A section given a value (`train: 5`, `data: {synthetic: yes}`) names its key; OmegaConf's merge would not.
    An empty section (`train:` with its keys commented out) is dropped."""
    for key in list(node):
        if key in schema and isinstance(schema[key], DictConfig):
            if node[key] is None:
                del node[key]
                continue
            if not isinstance(node[key], DictConfig):
                raise ConfigError(f"config key '{prefix}{key}' is a section of keys ({prefix}{key}.<key>: ...), "
                                  f"not a value ({source})")
            _check_sections(schema[key], node[key], source, f"{prefix}{key}.")


def load_config(path: str | None, overrides: list[str] = (), training: bool = True) -> Config:
    """Schema defaults <- YAML (with extends) <- dotlist overrides, then validation. training=False: a config read to
    caption or evaluate with, which needs no training split (a transformers folder's has none: export.folder_meta)."""
    obj: Config = load_structured(Config, path, overrides)
    obj.train.deepspeed_config = resolve_path(obj.train.deepspeed_config)
    obj.clip_model_configs = resolve_path(obj.clip_model_configs)
    obj.generation.early_stopping = obj.generation.early_stopping.lower()  # YAML's true reads back as 'True'
    validate(obj, training)
    return obj


def _check_text_override(cfg, node, item: str) -> None:
    """A text key whose override value YAML reads as a mapping or a list (`captioner.prompt=Caption: a photo` is
    {'Caption': 'a photo'}): one line saying to quote it, not OmegaConf's 'Cannot convert DictConfig to string'."""
    key = override_key(item)
    value = OmegaConf.select(node, key, default=None, throw_on_resolution_failure=False)  # ${...}: the merged config's
    if isinstance(value, (DictConfig, ListConfig)) and isinstance(OmegaConf.select(cfg, key, default=None), str):
        kind = "a mapping" if isinstance(value, DictConfig) else "a list"
        raise ConfigError(f"override '{item}': YAML reads the value as {kind}, not text (quote it: '{key}=\"...\"')")


def load_structured(schema, path: str | None, overrides: list[str] = ()):
    """An instance of the dataclass `schema`: its defaults <- YAML (with extends) <- dotlist overrides; an unknown
    key or a wrong type raises ConfigError naming the key."""
    cfg = OmegaConf.structured(schema)
    if path:
        try:
            cfg = OmegaConf.merge(cfg, _read_yaml(Path(path), cfg))
        except OmegaConfBaseException as e:
            raise _one_line(e, path) from None
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override '{item}' is not key=value")
        if item.endswith("="):  # `key=` means the empty string (OmegaConf would read null)
            item += "''"
        item = _rename_override(item)
        try:
            node = OmegaConf.from_dotlist([item])
            _join_name_lists(node, f"override {item}")
            _check_text_override(cfg, node, item)
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as e:
            raise _one_line(e, f"override {item}", item.split("=", 1)[0]) from None
        except yaml.YAMLError:  # the value is read as YAML: `[`, `{a`, `,` are not
            raise ConfigError(f"override '{item}': the value is not valid YAML (quote it: "
                              f"'{item.split('=', 1)[0]}=\"...\"')") from None
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


def to_yaml(c: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(c))


def flatten(c: Config | dict) -> dict[str, str]:
    """Dotted key -> value (of a config, or of a plain nested dict such as a checkpoint's config.yaml), for MLflow
    params and for comparing two configs."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v
    walk(c if isinstance(c, dict) else OmegaConf.to_container(OmegaConf.structured(c)), "")
    return out
