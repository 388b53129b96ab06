"""What a stage gives the training loop: a trainable module, preprocessing, `step` and `validate`.

The loop knows nothing about DiCO: it moves batches, calls `step(engine, batch) -> StepOutput`, backpropagates the
loss through DeepSpeed and logs what comes back.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from ..checks import check, check_reward
from ..config import Config
from ..data.tokenizer import CaptionTokenizer
from ..engine import gathered
from ..errors import ConfigError
from ..kernels import interpreting
from ..models import build_captioner
from ..models.clip_scorer import ClipScorer, distinct_preprocess
from ..models.weights import recorded_stage
from ..rewards import needs_evaluator
from ..validate import CAPTION_METRICS, caption_metrics, caption_split, gather_records, score_records
from . import captioner_stages


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
    images: int = 0
    tokens: int = 0


class Stage:
    name = "base"
    model_name = "captioner"  # what the trainable module is called in logs (memory accounting)
    module: torch.nn.Module  # what DeepSpeed trains
    preprocess = None  # image transform of the trainable model
    eval_preprocess = None  # evaluator's transform when it differs from `preprocess`

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        self.tokenizer = CaptionTokenizer()

    def decay_exempt(self, name: str, param: torch.nn.Parameter) -> bool:
        """Whether optim.weight_decay spares this trainable parameter (none is spared unless a stage says so)."""
        return False

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Checks of the keys only this stage reads (checks.check: a one-line ConfigError naming the key);
        checks.validate calls it last, after the checks every stage shares."""

    @classmethod
    def validation_metrics(cls, cfg: Config) -> set[str] | None:
        """The names (without 'val/') that the stage's validation logs under cfg, for the config checks of
        train.select_best and select_floor; None: known only once it ran (checked then)."""
        return None

    @classmethod
    def frozen_files(cls, cfg: Config) -> dict[str, str]:
        """{label: weights path} of the frozen models this stage trains against; "" = drawn at random (train.seed).
        frozen.py fingerprints them into every checkpoint, and a resume whose files differ stops. A model that only
        scores validation captions is not one: it does not change what is trained."""
        return {}

    def frozen_models(self) -> dict[str, tuple[torch.nn.Module, str, int]]:
        """The frozen models to run through DeepSpeed beside the trainable one: {name: (module, placement, hidden
        width)}; train.py wraps each with engine.build_frozen and hands the engines to `setup`."""
        return {}

    def setup(self, engine, frozen: dict | None = None) -> None:
        """Called once DeepSpeed has wrapped (and maybe cast) the module; `frozen`: the engines of frozen_models
        (None: the frozen modules run as they are, on this stage's device and dtype: tests, one process)."""
        self.dtype = next(engine.module.parameters()).dtype

    def step(self, engine, batch: dict) -> StepOutput:
        raise NotImplementedError

    def validate(self, engine, loader) -> tuple[dict[str, float], dict]:
        """(metrics, artifacts) on every rank; collective: all ranks call it together."""
        return {}, {}


def val_share(limit: int, world: int, rank: int) -> int | None:
    """This rank's share of train.val_max_images (0: none to read), the shares summing to the limit; None: no
    limit (the whole val split)."""
    return limit // world + (rank < limit % world) if limit else None


class CaptionerStage(Stage):
    """Shared by xe, dico and scst: the captioner, an optional frozen evaluator, caption validation."""
    reward_key = ""  # the config key of the stage's reward spec (e.g. "dico.reward"); "" = trained without one

    @classmethod
    def reward_spec(cls, cfg: Config) -> str:
        section, _, key = cls.reward_key.partition(".")
        return getattr(getattr(cfg, section), key) if cls.reward_key else ""

    @classmethod
    def check_config(cls, cfg):
        if cls.reward_key:
            check_reward(cls.reward_spec(cfg), cls.reward_key)
        start = cfg.train.init_from
        if start and (then := recorded_stage(start)) and then not in captioner_stages():
            check(False, "train.init_from", f"'{start}' was exported by a run of the {then} stage (an evaluator, for "
                  "evaluator.weights), not a captioner")

    @classmethod
    def builds_evaluator(cls, cfg: Config) -> bool:
        """Whether the stage builds the evaluator: its reward reads it, or evaluator.weights names one (the
        validation's evaluator score)."""
        spec = cls.reward_spec(cfg)
        return bool(cfg.evaluator.weights) or (bool(spec) and needs_evaluator(spec))

    @classmethod
    def validation_metrics(cls, cfg: Config) -> set[str]:
        return set(CAPTION_METRICS) | ({"evaluator_score"} if cls.builds_evaluator(cfg) else set())

    @classmethod
    def frozen_files(cls, cfg):
        """The evaluator, when the stage's reward reads it."""
        spec = cls.reward_spec(cfg)
        if spec and needs_evaluator(spec):
            return {"evaluator weights (evaluator.weights)": cfg.evaluator.weights}
        return {}

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        self.module = build_captioner(cfg, cfg.train.init_from)
        self.tokenizer = self.module.tokenizer
        self.preprocess = self.module.preprocess
        self.evaluator = None
        if self.builds_evaluator(cfg):
            self.evaluator = ClipScorer(cfg.evaluator)
            self.eval_preprocess = distinct_preprocess(self.evaluator, self.preprocess)
        self.evaluator_engine = None

    def logprob_shape(self) -> tuple[int, int, int]:
        """(images, sequences per image, tokens) of one rank's log-prob pass with gradients (the start's activation
        projection, dico_scale.activations): XE teacher-forces one reference caption per image."""
        return self.cfg.train.micro_batch_size, 1, self.cfg.data.max_caption_tokens

    def frozen_models(self):
        if self.evaluator is None:
            return {}
        return {"evaluator": (self.evaluator, self.cfg.evaluator.placement, self.evaluator.width)}

    def setup(self, engine, frozen=None):
        super().setup(engine, frozen)
        if self.evaluator is None:
            return
        if frozen and "evaluator" in frozen:
            self.evaluator_engine = frozen["evaluator"]
            self.evaluator.bind(self.evaluator_engine, self.dtype)
        else:
            self.evaluator.to(self.device)

    def generate(self, engine, batch: dict, *rollouts) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(visual tokens, each rollout's candidates) of the batch's images, the captioner gathered once for all of
        them: generation's length depends on the data, so under ZeRO-3 one gather, not one per token."""
        pixels = batch["pixels"].to(self.device, self.dtype)
        with gathered(engine) as policy:
            with torch.no_grad():
                visual_tokens = policy.visual_tokens(pixels)
            return visual_tokens, [r.candidates(policy, visual_tokens) for r in rollouts]

    def score_candidates(self, batch: dict, candidates: torch.Tensor) -> torch.Tensor:
        """[B, k] rewards (self.reward) of candidates [B*k, L], the k of an image in consecutive rows."""
        pixels = batch.get("eval_pixels", batch["pixels"]).to(self.device)
        B = pixels.size(0)
        captions = self.tokenizer.decode_batch(candidates)
        k = len(captions) // B
        return self.reward(pixels, [captions[b * k:(b + 1) * k] for b in range(B)], batch.get("refs"))

    def validate(self, engine, loader):
        """CIDEr, evaluator score and image count of the val split, as `dico_scale.evaluate` computes them (see
        dico_scale/validate.py); with train.val_max_images each rank takes its share of the first images. Ranks
        caption different numbers of batches: under ZeRO-3 the captioner and evaluator are gathered once for it."""
        g = self.cfg.generation
        grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
        world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if grouped else (1, 0)
        share = val_share(self.cfg.train.val_max_images, world, rank)
        evaluators = {"evaluator": self.evaluator} if self.evaluator is not None else {}
        with gathered(engine) as captioner, gathered(self.evaluator_engine):
            records = gather_records(caption_split(captioner, self.tokenizer, loader if share != 0 else [], g,
                                                   self.device, evaluators, share or 0))
            if rank != 0:
                return {}, {}
            records = score_records(records, self.evaluator)
        return caption_metrics(records), {"val_captions.json": records}


def log_prob_path(kernel: str, device: torch.device) -> tuple[str, bool]:
    """(loss.kernel, fused) of a sequence-level stage: fused = decoder states and the head weight go to the
    fused Triton kernel, which never materialises the [B*k, T, V] logits (the torch path does, as the DiCO code)."""
    if kernel == "triton" and device.type != "cuda" and not interpreting():
        raise ConfigError("loss.kernel=triton needs CUDA (or TRITON_INTERPRET=1 to interpret the kernels on the CPU)")
    if kernel == "triton" and device.type == "cuda":
        print("dico_scale: warning: loss.kernel=triton trains through the fused head's backward, which failed its H200 "
              "check (docs/kernels.md); loss.kernel=auto keeps it to gradient-free calls", file=sys.stderr, flush=True)
    return kernel, kernel == "triton" or (kernel == "auto" and device.type == "cuda")
