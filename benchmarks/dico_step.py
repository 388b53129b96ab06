"""Images/s of one DiCO (or SCST) training step on one device: candidates, rewards, policy and reference log-probs,
loss, backward and an optimizer step, on random images (no loader, no DeepSpeed, no communication); a reward that
reads references (CIDEr-D) gets those of the config's first training images. It is what a data loader must feed per
device; benchmarks/data.py measures what the loader delivers. The reward's own share of the step is timed too.

    python benchmarks/dico_step.py                                     # the COCO model sizes (GPU)
    python benchmarks/dico_step.py --config configs/demo/dico.yaml     # the demo's tiny models (CPU)
    python benchmarks/dico_step.py --config configs/demo/scst.yaml --stage scst scst.reward=cider
    python benchmarks/dico_step.py --config configs/smolvlm/dico.yaml --captioners idefics3,idefics3:lora \
        --hf-size 1024,4,16,224 --kernels auto                         # a small VLM, full fine-tuning and LoRA (GPU)

Each `--kernels` entry is timed in the same run (auto: the fused Triton head on CUDA; torch: materialised logits),
for each `--captioners` row; a row `NAME:lora` trains LoRA adapters as configs/smolvlm and configs/qwen2vl do, the
others every weight the row does not freeze.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from dico_scale.config import load_config  # noqa: E402
from dico_scale.data.pipeline import Collate  # noqa: E402
from dico_scale.errors import ConfigError, OneLineParser  # noqa: E402
from dico_scale.models.clip import register_model_configs  # noqa: E402
from dico_scale.preflight import out_file_problem  # noqa: E402
from dico_scale.rewards import parse_reward  # noqa: E402
from dico_scale.stages import build_stage  # noqa: E402

# Random weights: the step's cost does not depend on them, and no checkpoint is needed.
RANDOM_WEIGHTS = ["train.init_from=", "captioner.image_encoder_weights=", "evaluator.weights="]
LORA = ["captioner.lora.r=16", "captioner.lora.alpha=32", "captioner.lora.target_modules=q_proj,k_proj,v_proj,o_proj"]
IMAGE_PX = 224  # the random images' side: a VLM's processor tiles or patches them by its own rules


class Local:
    """The part of a DeepSpeed engine the stage uses: `module` and a forward call (its seconds added to
    phases[name])."""

    def __init__(self, module, phases: dict | None = None, name: str = "policy", device=None):
        self.module, self.phases, self.name, self.device = module, phases, name, device

    def __call__(self, *args, **kwargs):
        if self.phases is None:
            return self.module(*args, **kwargs)
        return timed(self.module, self.phases, self.name, self.device)(*args, **kwargs)


def timed(fn, phases: dict, name: str, device):
    """fn, its seconds added to phases[name] at each call."""
    def call(*args, **kwargs):
        sync(device)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sync(device)
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
        return out
    return call


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timed:
    """A reward that adds the seconds of each call to `seconds` (CPU work: no device sync needed for CIDEr-D)."""

    def __init__(self, reward, device):
        self.reward, self.device, self.seconds = reward, device, 0.0

    def __call__(self, *args):
        sync(self.device)
        t0 = time.perf_counter()
        out = self.reward(*args)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out


def random_batch(stage, cfg, refs: list[list[str]]) -> dict:
    """Random images (one per entry of refs) through the row's own transforms, collated as the loader does: a VLM's
    processor gives its tiles or patch grid and the prompt, the evaluator its own pixels where they differ."""
    from PIL import Image

    rng = np.random.default_rng(0)
    collate = Collate(stage.preprocess, stage.eval_preprocess, stage.tokenizer, cfg.data.max_caption_tokens, 0)
    images = [Image.fromarray(rng.integers(0, 256, (IMAGE_PX, IMAGE_PX, 3), dtype=np.uint8)) for _ in refs]
    return collate([(collate.prepare(im), r, str(i)) for i, (im, r) in enumerate(zip(images, refs))])


def references(cfg, n: int) -> list[list[str]]:
    """The reference lists of the first n images of the config's training split (the CIDEr-D reward reads them)."""
    from dico_scale.data.splits import split_shards
    from dico_scale.rewards.cider import training_references

    urls, _ = split_shards(cfg, "train", log_missing=False)
    refs = []
    for r in training_references(urls):
        refs.append(r)
        if len(refs) == n:
            return refs
    raise SystemExit(f"the training split has fewer than {n} images")


def bench_config(config: str, overrides: list[str], kernel: str, batch: int, stage_name: str):
    return load_config(config, RANDOM_WEIGHTS + overrides + [
        f"loss.kernel={kernel}", f"train.micro_batch_size={batch}", f"train.stage={stage_name}"])


class Bench:
    """One captioner row's DiCO (or SCST) stage, ready to time one training step at a time: rows are interleaved
    step by step so that load from other processes falls on all of them alike."""

    def __init__(self, config: str, overrides: list[str], kernel: str, batch: int, device, stage_name: str = "dico",
                 label: str = "builtin"):
        cfg = bench_config(config, overrides, kernel, batch, stage_name)
        register_model_configs(cfg.clip_model_configs)
        torch.manual_seed(0)
        self.stage = stage = build_stage(cfg, device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as DeepSpeed's bf16 config casts it
        stage.module.to(device, dtype)
        if stage.evaluator is not None:
            stage.evaluator.to(device)
        self.phases: dict[str, float] = {}
        self.engine = Local(stage.module, self.phases, "policy", device)
        stage.setup(self.engine)
        stage.reward = Timed(stage.reward, device)
        stage.generate = timed(stage.generate, self.phases, "generate", device)
        stage.score_candidates = timed(stage.score_candidates, self.phases, "reward", device)
        if hasattr(stage, "reference_engine"):  # with LoRA the reference is the policy, its adapters disabled
            reference = stage.module if stage.reference is None else stage.reference
            stage.reference_engine = Local(reference, self.phases, "reference", device)
        trainable = [p for p in stage.module.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr=1e-6)
        # only a reward that reads references (CIDEr-D) needs the training split; the others run without data
        spec = getattr(cfg, stage_name).reward
        refs = references(cfg, batch) if any(n == "cider" for _, n in parse_reward(spec)) else [[""]] * batch
        self.batch_data = random_batch(stage, cfg, refs)
        self.device, self.info = device, {"captioner": label, "stage": stage_name, "kernel": kernel,
                                          "fused_head": stage.fused, "batch_images": batch,
                                          "lora_r": cfg.captioner.lora.r,
                                          "trainable_params": sum(p.numel() for p in trainable)}
        self.times, self.tokens, self.reward_s, self.shares, self.peak = [], [], [], [], 0.0

    def step(self, record: bool) -> None:
        stage, device = self.stage, self.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0, stage.reward.seconds = time.perf_counter(), 0.0
        self.phases.clear()
        out = stage.step(self.engine, self.batch_data)
        timed(out.loss.backward, self.phases, "backward", device)()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(device)
        if record:
            self.times.append(time.perf_counter() - t0)
            self.tokens.append(out.tokens)
            self.reward_s.append(stage.reward.seconds)
            self.shares.append({k: v / self.times[-1] for k, v in self.phases.items()})
            if device.type == "cuda":
                self.peak = max(self.peak, torch.cuda.max_memory_allocated() / 2**30)

    def row(self) -> dict:
        med = statistics.median(self.times)
        row = {**self.info, "median_step_s": med, "images_per_s": self.info["batch_images"] / med,
               "candidate_tokens_per_step": statistics.mean(self.tokens),
               "median_reward_s": statistics.median(self.reward_s),
               "phase_shares": {k: statistics.mean(s[k] for s in self.shares) for k in self.shares[0]}}
        if self.device.type == "cuda":
            row["peak_mem_gib"] = self.peak
        return row


def run_interleaved(benches: list[Bench], steps: int, warmup: int) -> list[dict]:
    for i in range(warmup + steps):
        for b in benches:
            b.step(record=i >= warmup)
    return [b.row() for b in benches]


def check_args(p: OneLineParser, a) -> None:
    """What would fail after models are built (a traceback, or a StatisticsError at the end): one line, exit 2."""
    from dico_scale.demo import CAPTIONER_FAMILIES

    for flag, least in (("steps", 1), ("warmup", 0), ("batch", 1)):
        if getattr(a, flag) < least:
            p.error(f"--{flag} {getattr(a, flag)} must be at least {least}")
    for c in a.captioners.split(","):
        name, _, mode = c.partition(":")
        if mode not in ("", "lora"):
            p.error(f"--captioners: {c}: the only suffix is :lora")
        if name not in ("builtin", *CAPTIONER_FAMILIES):
            p.error(f"--captioners: {name} not among builtin, {', '.join(CAPTIONER_FAMILIES)}")
    if a.hf_size and not re.fullmatch(r"[1-9]\d*(,[1-9]\d*){3}", a.hf_size):
        p.error(f"--hf-size {a.hf_size}: want WIDTH,LAYERS,HEADS,IMAGE_SIZE, four positive integers")
    if a.json and (problem := out_file_problem(a.json)):
        p.error(f"--json {problem}")


def main(argv=None) -> int:
    p = OneLineParser(prog="dico_step.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/coco/dico.yaml")
    p.add_argument("--kernels", default="auto,torch", help="comma-separated loss.kernel values to time")
    p.add_argument("--batch", type=int, default=8, help="images per step (x generation.candidates)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stage", default="dico", choices=("dico", "scst"))
    p.add_argument("--captioners", default="builtin", help="comma-separated dico_scale.demo --captioner names "
                   "(builtin, vit-gpt2, blip, dico_ref, idefics3, qwen2-vl, ...), each optionally NAME:lora: each "
                   "timed in the same run, HF rows as random models of --hf-size written under --models")
    p.add_argument("--hf-size", help="WIDTH,LAYERS,HEADS,IMAGE_SIZE of the HF rows' random models (default: the "
                   "demo's 128,2,4,64)")
    p.add_argument("--models", default="runs/models-bench", help="where the HF rows' random models are written")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    a = p.parse_args(argv)
    check_args(p, a)
    device = torch.device(a.device)
    from dico_scale.demo import captioner_overrides

    size, root = {}, a.models
    if a.hf_size:
        size = dict(zip(("width", "layers", "heads", "image_size"), map(int, a.hf_size.split(","))))
        root = os.path.join(a.models, "-".join(f"{k}{v}" for k, v in size.items()))  # one folder per size

    def overrides(row: str) -> list[str]:
        # HF rows with the CLIP BPE's vocabulary size, as the built-in captioner's head (a VLM's stays its BPE's)
        name, _, mode = row.partition(":")
        lora = LORA if mode == "lora" else ["captioner.lora.r=0"]
        return captioner_overrides(name, root, vocab_size=49409, **size) + lora + a.overrides

    pairs = [(c, k) for c in a.captioners.split(",") for k in a.kernels.split(",")]
    try:  # each row's config first: a bad --config, key or --kernels entry before any model is built
        for c, k in pairs:
            bench_config(a.config, overrides(c), k, a.batch, a.stage)
        benches = [Bench(a.config, overrides(c), k, a.batch, device, a.stage, c) for c, k in pairs]
    except ConfigError as e:
        p.error(str(e).splitlines()[0])
    rows = run_interleaved(benches, a.steps, a.warmup)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}; config {a.config}; "
          f"{a.steps} timed steps after {a.warmup} warm-up, the rows interleaved step by step (peak GiB: the "
          "device's peak in a row's steps, every row's models resident)")
    print("| captioner | stage | loss.kernel | fused head | images/step | trained parameters | median step | "
          "images/s | reward (median) | peak GiB | phase shares |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in r["phase_shares"].items())
        peak = f"{r['peak_mem_gib']:.2f}" if "peak_mem_gib" in r else "-"
        print(f"| {r['captioner']} | {r['stage']} | {r['kernel']} | {r['fused_head']} | {r['batch_images']} | "
              f"{r['trainable_params']:,} | {r['median_step_s'] * 1e3:.1f} ms | {r['images_per_s']:.1f} | "
              f"{r['median_reward_s'] * 1e3:.1f} ms | {peak} | {shares} |")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"device": name, "platform": platform.platform(), "torch": torch.__version__,
                       "config": a.config, "overrides": a.overrides, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
