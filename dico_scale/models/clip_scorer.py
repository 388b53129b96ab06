"""The CLIP scorer behind the `evaluator:` config section (frozen in dico, scst and validation, trained by the
`evaluator` stage): CLIP-S = 2.5 * max(cos, 0), PAC-S = 2.0 * max(cos, 0); as a training reward
(dico.reward_clamp=false, the default) w * cos without the clamp, as the DiCO code scores candidates."""
from __future__ import annotations

import weakref

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import EvaluatorConfig
from .clip import create_clip

METRIC_WEIGHTS = {"clips": 2.5, "pacs": 2.0}
# A frozen evaluator without a weights file (tests, demos, a first try) is drawn from this seed, not from the global
# generator: the trainer, the held-out tables and evaluate build it at different points of their random streams and
# would otherwise each score with another random CLIP.
RANDOM_EVALUATOR_SEED = 0


class ClipScorer(nn.Module):
    def __init__(self, cfg: EvaluatorConfig, trainable: bool = False):
        super().__init__()
        if cfg.weights or trainable:  # the evaluator stage's random start is the run's (train.seed)
            self.clip, self.preprocess = create_clip(cfg.model, cfg.weights)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_EVALUATOR_SEED)
                self.clip, self.preprocess = create_clip(cfg.model)
        self.tokenizer = open_clip.get_tokenizer(cfg.model)
        self.weight = METRIC_WEIGHTS[cfg.metric]
        self.prefix = cfg.caption_prefix
        self.width = self.clip.visual.ln_post.normalized_shape[0]
        self.input_dtype = torch.float32  # what pixels are cast to: the dtype DeepSpeed gives the weights
        self._engine = None  # a weak reference to the DeepSpeed engine wrapping this module (bind)
        if not trainable:
            self.clip.requires_grad_(False)
            self.clip.eval()

    def bind(self, engine, dtype: torch.dtype) -> None:
        """Route the feature calls through `engine`'s forward (ZeRO-3 gathers parameters only there). Weak: the
        engine holds this module."""
        self._engine, self.input_dtype = weakref.ref(engine), dtype

    def forward(self, pixels: torch.Tensor | None = None, text: torch.Tensor | None = None):
        """(normalised fp32 image features or None, normalised fp32 text features or None)."""
        image = None if pixels is None else F.normalize(self.clip.encode_image(pixels.to(self.input_dtype)).float(), dim=-1)
        return image, None if text is None else F.normalize(self.clip.encode_text(text).float(), dim=-1)

    def _run(self, **inputs):
        """Through the bound engine's forward; unbound (one process, or inside engine.gathered) the plain forward,
        without any hook."""
        engine = self._engine() if self._engine is not None else None
        return engine(**inputs) if engine is not None else self.forward(**inputs)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        device = next(self.clip.parameters()).device
        return self.tokenizer([self.prefix + c for c in captions]).to(device)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run(pixels=pixels)[0]

    def text_features(self, captions: list[str]) -> torch.Tensor:
        return self._run(text=self.tokenize(captions))[1]

    @torch.no_grad()
    def score(self, image_features: torch.Tensor, captions: list[str], clamp: bool = True) -> torch.Tensor:
        """Score of caption i against image_features[i]: weight * max(cos, 0), the CLIP-S / PAC-S of the official
        tools; clamp=False: weight * cos, the DiCO code's training reward (below-zero candidates stay ranked)."""
        return reward(self.weight, (image_features * self.text_features(captions)).sum(-1), clamp)


def reward(weight: float, cos: torch.Tensor, clamp: bool) -> torch.Tensor:
    return weight * (cos.clamp(min=0) if clamp else cos)


def distinct_preprocess(evaluator: ClipScorer, preprocess):
    """The evaluator's image transform when it differs from the captioner's, else None (one tensor serves both)."""
    return None if repr(evaluator.preprocess) == repr(preprocess) else evaluator.preprocess
