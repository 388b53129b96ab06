"""The `evaluator` stage (train.stage=evaluator): contrastive (CLIP loss) fine-tuning of the evaluator, the CLIP
scorer of models/clip_scorer.py, on image-caption shards.

The demo needs it: a randomly initialised CLIP gives DiCO a meaningless reward. Validation reports image<->text
retrieval recall over the val split (first reference caption per image), `metrics.recall_at_k` as `evaluate`
computes it (logged as val/i2t_r1, val/i2t_r5, val/t2i_r1, val/t2i_r5).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from .. import metrics
from ..checks import check
from ..engine import gathered
from ..errors import ConfigError
from ..models.clip_scorer import ClipScorer
from ..models.weights import load_weights
from .base import Stage, StepOutput, val_share


def hide_clip_loss_deprecation() -> None:
    """ClipLoss gathers with torch.distributed.nn.all_gather, which torch 2.14 deprecates (a FutureWarning twice per
    step and rank): open_clip's call, not ours, so that exact warning from open_clip is hidden."""
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                            category=FutureWarning, module="open_clip")


class ContrastiveStage(Stage):
    name = "evaluator"
    model_name = "evaluator"
    val_ks = (1, 5)  # validation's recall@k

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.evaluator = ClipScorer(cfg.evaluator, trainable=True)
        self.module = self.evaluator.clip  # DeepSpeed trains (and exports) the plain open_clip model
        if cfg.train.init_from:
            load_weights(self.module, cfg.train.init_from)
        self.preprocess = self.evaluator.preprocess
        # Features of all ranks enter the loss (gradients through the gather), as open_clip's trainer does.
        world = dist.get_world_size()
        if cfg.train.micro_batch_size * world < 2:  # one image has no other caption to be told apart from
            raise ConfigError(f"train.micro_batch_size={cfg.train.micro_batch_size}: the evaluator stage's "
                              f"contrastive loss needs at least 2 images per step across its {world} rank(s), or it "
                              "is 0 and trains nothing")
        self.loss = ClipLoss(gather_with_grad=True, rank=dist.get_rank(), world_size=world)
        hide_clip_loss_deprecation()

    @classmethod
    def check_config(cls, cfg):
        """train.init_from starts the evaluator: a captioner's export there is named as one, before any rank starts."""
        from ..models.clip_weights import captioner_export_problem

        if cfg.train.init_from and (problem := captioner_export_problem(cfg.train.init_from, "train.init_from")):
            check(False, "train.init_from", f"'{cfg.train.init_from}' is {problem}")

    def decay_exempt(self, name, param):
        """open_clip's training recipe: no weight decay on gains, biases, embeddings of one dimension and the
        logit scale (decay shrank the temperature and the LayerNorm gains toward 0)."""
        return param.ndim < 2 or "logit_scale" in name

    @classmethod
    def validation_metrics(cls, cfg):
        return {f"{d}_r{k}" for d in ("i2t", "t2i") for k in cls.val_ks}

    def step(self, engine, batch) -> StepOutput:
        pixels = batch["pixels"].to(self.device, self.dtype)
        text = self.evaluator.tokenize(batch["captions"])  # the reference the pipeline sampled for each image
        image_features, text_features, logit_scale = engine(pixels, text)[:3]
        logit_scale = logit_scale.clamp(max=100.0)  # CLIP's cap on the temperature
        loss = self.loss(image_features, text_features, logit_scale)
        return StepOutput(loss, {"evaluator/logit_scale": logit_scale.detach()}, images=pixels.size(0),
                          tokens=int((text != 0).sum()))

    @torch.no_grad()
    def validate(self, engine, loader):
        """Ranks read different numbers of val batches: under ZeRO-3 the model is gathered once for it. With
        train.val_max_images each rank takes its share of the first images."""
        share = val_share(self.cfg.train.val_max_images, dist.get_world_size(), dist.get_rank())
        self.module.eval()
        try:
            with gathered(engine) as clip:
                feats = []  # (key, normalised image feature, first reference)
                for batch in loader if share != 0 else []:
                    img = F.normalize(clip.encode_image(batch["pixels"].to(self.device, self.dtype)).float(), dim=-1)
                    feats += [(k, i.cpu().clone(), refs[0]) for k, i, refs in zip(batch["keys"], img, batch["refs"])]
                    if share and len(feats) >= share:
                        feats = feats[:share]
                        break
                parts = [None] * dist.get_world_size()
                dist.all_gather_object(parts, feats)
                if dist.get_rank() != 0:
                    return {}, {}
                rows = sorted({k: (i, t) for part in parts for k, i, t in part}.items())
                if not rows:
                    return {}, {}
                images = torch.stack([i for _, (i, _) in rows])
                # each distinct text encoded once: equal references tie exactly
                texts = metrics.text_features(self.evaluator, [t for _, (_, t) in rows])
        finally:
            self.module.train()
        return {name.lower(): v for name, v in metrics.recall_at_k(images, texts, ks=self.val_ks).items()}, {}
