"""One evaluation path (#12): in-loop validation and `dico_scale.evaluate` share captioning, CIDEr, the evaluator
score and retrieval recall, so a checkpoint's in-loop numbers equal evaluate's on the same split; empty captions and
retrieval ties are treated one way (README "Metrics")."""
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dico_scale import metrics

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "demo"


# ---- ties in retrieval recall ----------------------------------------------------------------------------------------

def argsort_ranks(sims: torch.Tensor) -> torch.Tensor:
    """open_clip's get_clip_metrics ranks, with a stable sort: position of column i in row i's descending order."""
    ranking = torch.argsort(sims, dim=1, descending=True, stable=True)
    return torch.where(ranking == torch.arange(sims.size(0)).unsqueeze(1))[1]


def test_match_ranks_equal_stable_argsort_positions():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 30):
        sims = torch.randint(0, 3, (n, n), generator=g).double()  # three values only: ties everywhere
        assert torch.equal(metrics.match_ranks(sims), argsort_ranks(sims))
        assert torch.equal(metrics.match_ranks(sims.T), argsort_ranks(sims.T))


def test_recall_breaks_ties_by_index():
    images = torch.eye(3)
    texts = torch.stack([torch.eye(3)[0], torch.eye(3)[0], torch.eye(3)[2]])  # captions 0 and 1 are the same text
    r = metrics.recall_at_k(images, texts, ks=(1, 2, 3))
    # i2t: image 0 -> caption 0 first of the tied 0, 1: rank 0; image 1 scores 0 everywhere, caption 0 before it: 1;
    # image 2 -> 0
    assert (r["i2t_R1"], r["i2t_R2"], r["i2t_R3"]) == pytest.approx((2 / 3, 1.0, 1.0))
    # t2i: caption 0 -> image 0: 0; caption 1 -> image 0 scores strictly higher than image 1: 1; caption 2 -> 0
    assert (r["t2i_R1"], r["t2i_R2"], r["t2i_R3"]) == pytest.approx((2 / 3, 1.0, 1.0))


def test_one_caption_for_several_images_is_one_hit():
    images = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    texts = images.clone()
    texts[1:] = texts[0] + 1.0  # images 1, 2, 3 get one same caption, far from caption 0
    texts = torch.nn.functional.normalize(texts, dim=-1)
    sims = images.double() @ texts.double().T
    r = metrics.recall_at_k(images, texts, ks=(1, 4))
    expected = (argsort_ranks(sims) < 1).double().mean()
    assert r["i2t_R1"] == pytest.approx(float(expected)) and r["i2t_R4"] == 1.0
    # of images 1-3 at most one (the first whose best caption is the shared one) is a hit: never all three
    assert r["i2t_R1"] <= 2 / 4


def test_recall_of_no_items_is_nan():
    r = metrics.recall_at_k(torch.zeros(0, 4), torch.zeros(0, 4), ks=(1,))
    assert set(r) == {"t2i_R1", "i2t_R1"} and all(v != v for v in r.values())


# ---- empty captions --------------------------------------------------------------------------------------------------

def test_empty_caption_is_the_empty_string_and_scores_zero():
    from pycocoevalcap.cider.cider import Cider

    records = [{"key": "a", "caption": "a red circle", "refs": ["a red circle", "a small red circle"]},
               {"key": "b", "caption": "", "refs": ["an empty box", "a box"]},
               {"key": "c", "caption": "...", "refs": ["two blue squares", "blue squares"]},
               {"key": "d", "caption": "Two blue squares.", "refs": ["two blue squares", "a pair of squares"]}]
    gts, res = metrics.ptb_tokenize(records)
    assert res == {"a": ["a red circle"], "b": [""], "c": [""], "d": ["two blue squares"]}  # nothing shifted
    score, per_image = Cider().compute_score(gts, res)
    assert per_image[1] == 0 and per_image[2] == 0 and per_image[0] > 0 and per_image[3] > 0
    assert metrics.cider(records) == float(score)
    # no placeholder word: "empty" would match the reference "an empty box"
    placeholder = [dict(r, caption=r["caption"] or "empty") for r in records]
    assert metrics.cider_score(*metrics.ptb_tokenize(placeholder)) > metrics.cider(records)


# ---- in-loop == evaluate ---------------------------------------------------------------------------------------------

class Engine:
    """What a stage's validate and step use of DeepSpeed's engine: .module, and calling it."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _config(stage: str, tmp, tiny_shards, extra=()):
    from dico_scale.config import load_config

    return load_config(str(CONFIGS / f"{stage}.yaml"), [
        "data.synthetic.enabled=false", f"data.train_shards={tiny_shards['train']}",
        f"data.val_shards={tiny_shards['val']}", f"data.test_shards={tiny_shards['test']}", "data.num_workers=0",
        f"evaluator.weights={tmp}/evaluator.pt", "captioner.image_encoder_weights=", "generation.candidates=2",
        "generation.max_len=8", "train.micro_batch_size=4", "train.val_max_images=0", "tracking.enabled=false",
        f"train.threads={torch.get_num_threads()}", f"train.output_dir={tmp}/{stage}", *extra])


def _val_loader(stage, cfg):
    """train.py's make_val_loader."""
    from dico_scale.data.pipeline import Collate, eval_loader

    collate = Collate(stage.preprocess, stage.eval_preprocess, stage.tokenizer, cfg.data.max_caption_tokens, seed=0)
    return eval_loader(cfg.data.val_shards, collate, cfg.train.micro_batch_size, cfg.data.num_workers)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_shards):
    """A tiny XE captioner taught three captions ("a red circle", "a blue square", the empty one) on four training
    images in a few seconds, so that its val captions are varied, repeated and partly right (CIDEr above 0); saved as
    model.pt the way the engine exports it. Beside it, random evaluator weights as a file."""
    from dico_scale.config import EvaluatorConfig, to_yaml
    from dico_scale.data.pipeline import Collate, eval_loader
    from dico_scale.models.clip_scorer import ClipScorer
    from dico_scale.stages.xe import XEStage

    tmp = tmp_path_factory.mktemp("one_eval_path")
    torch.manual_seed(0)  # a random CLIP with positive cosines for some of the val images
    ev = ClipScorer(EvaluatorConfig(model="dico-tiny", weights="", metric="clips"))
    torch.save({"state_dict": ev.clip.state_dict()}, tmp / "evaluator.pt")
    cfg = _config("xe", tmp, tiny_shards)
    torch.manual_seed(0)
    stage = XEStage(cfg, torch.device("cpu"))
    engine = Engine(stage.module)
    stage.setup(engine)
    collate = Collate(stage.preprocess, stage.eval_preprocess, stage.tokenizer, cfg.data.max_caption_tokens, seed=0)
    batch = next(iter(eval_loader(cfg.data.train_shards, collate, 4)))
    batch["tokens"] = stage.tokenizer.batch(["a red circle", "a blue square", "", "a red circle"],
                                            cfg.data.max_caption_tokens)
    opt = torch.optim.Adam([p for p in stage.module.parameters() if p.requires_grad], lr=3e-3)
    stage.module.train()
    for _ in range(30):
        loss = stage.step(engine, batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: v.detach().float().cpu().clone() for k, v in stage.module.state_dict().items()}
    torch.save({"state_dict": state, "config": to_yaml(cfg), "stage": "xe", "step": 30, "mlflow_run_id": None},
               tmp / "model.pt")
    return {"tmp": tmp, "model": tmp / "model.pt"}


def test_in_loop_validation_equals_evaluate(checkpoint, tiny_shards, clean_env, monkeypatch):
    import pycocoevalcap.meteor.meteor as meteor

    from dico_scale import evaluate
    from dico_scale.stages.xe import XEStage

    class NoMeteor:
        """METEOR has no in-loop twin, and its Java scorer costs ~10 s here: evaluate records it as an error, and the
        CIDEr compared below still comes from evaluate's coco_scores (each scorer fails alone)."""

        def __init__(self):
            raise RuntimeError("METEOR is not part of this comparison")

    monkeypatch.setattr(meteor, "Meteor", NoMeteor)

    tmp = checkpoint["tmp"]
    cfg = _config("xe", tmp, tiny_shards, [f"train.init_from={checkpoint['model']}"])
    stage = XEStage(cfg, torch.device("cpu"))
    engine = Engine(stage.module)
    stage.setup(engine)
    stage.module.train()  # as the loop hands it over
    val, artifacts = stage.validate(engine, _val_loader(stage, cfg))
    assert stage.module.training
    assert set(val) == {"cider", "images", "evaluator_score", "mean_length", "vocab_size", "repetition"}
    assert val["images"] == 10
    assert val["cider"] > 0 and val["evaluator_score"] > 0  # neither equality below is 0 == 0

    out = tmp / "eval_val.json"
    assert evaluate.main(["--checkpoint", str(checkpoint["model"]), "--shards", "val", "--no-spice",
                          "--train-shards", "none", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    m = result["metrics"]
    assert m["images"] == val["images"]
    assert m["CIDEr"] == pytest.approx(val["cider"], abs=1e-9)
    assert m["evaluator_score"] == pytest.approx(val["evaluator_score"], abs=1e-9)
    for key in ("mean_length", "vocab_size", "repetition"):  # the fluency statistics the compare figure draws
        assert m[key] == pytest.approx(val[key], abs=1e-12), key
    assert val["mean_length"] > 0 and val["vocab_size"] > 0
    in_loop = artifacts["val_captions.json"]
    assert [r["key"] for r in in_loop] == [c["key"] for c in result["captions"]]
    for r, c in zip(in_loop, result["captions"]):
        assert (r["caption"], r["refs"]) == (c["caption"], c["refs"])
        assert r["score"] == pytest.approx(c["evaluator_score"], abs=1e-9)
    assert result["settings"]["evaluator_score"]["caption_prefix"] == ""  # the run's, not evaluate's CLIP-S prefix
    g = cfg.generation  # the search in-loop validation used, recorded
    assert [result["settings"][k] for k in ("beam_size", "max_len", "length_penalty", "early_stopping",
                                            "repetition_penalty", "no_repeat_ngram_size")] == [
        g.candidates, g.max_len, g.length_penalty, g.early_stopping, g.repetition_penalty, g.no_repeat_ngram_size]


@pytest.fixture
def one_rank_group(tmp_path, clean_env):
    """A gloo group of one (the evaluator stage's ClipLoss and validate need one)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_evaluator_stage_recall_is_metrics_recall(checkpoint, tiny_shards, one_rank_group):
    from dico_scale.stages.contrastive import ContrastiveStage

    cfg = _config("evaluator", checkpoint["tmp"], tiny_shards)
    stage = ContrastiveStage(cfg, torch.device("cpu"))
    engine = Engine(stage.module)
    stage.setup(engine)
    val, _ = stage.validate(engine, _val_loader(stage, cfg))
    assert stage.module.training and set(val) == {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"}  # the names logged today
    assert set(val) == ContrastiveStage.validation_metrics(cfg)  # what train.select_best is checked against

    images, refs, keys = [], [], []
    with torch.no_grad():
        stage.module.eval()
        for batch in _val_loader(stage, cfg):
            images.append(stage.evaluator.image_features(batch["pixels"]))
            refs += [r[0] for r in batch["refs"]]
            keys += batch["keys"]
    assert keys == sorted(keys)
    expected = metrics.recall_at_k(torch.cat(images), metrics.text_features(stage.evaluator, refs), ks=(1, 5))
    assert val == {k.lower(): v for k, v in expected.items()}


def test_evaluator_stage_reads_val_max_images_and_refuses_a_batch_of_one(checkpoint, tiny_shards, one_rank_group):
    """train.val_max_images: the recall of the first images alone; one image per step (across ranks) has no other
    caption to be told apart from: a loss of 0, refused."""
    from dico_scale.config import ConfigError
    from dico_scale.stages.contrastive import ContrastiveStage

    cfg = _config("evaluator", checkpoint["tmp"], tiny_shards, ["train.val_max_images=3", "train.micro_batch_size=2"])
    stage = ContrastiveStage(cfg, torch.device("cpu"))
    engine = Engine(stage.module)
    stage.setup(engine)
    val, _ = stage.validate(engine, _val_loader(stage, cfg))
    with torch.no_grad():
        stage.module.eval()
        batches = list(_val_loader(stage, cfg))[:2]
        images = torch.cat([stage.evaluator.image_features(b["pixels"]) for b in batches])[:3]
        refs = [r[0] for b in batches for r in b["refs"]][:3]
    expected = metrics.recall_at_k(images, metrics.text_features(stage.evaluator, refs), ks=(1, 5))
    assert val == {k.lower(): v for k, v in expected.items()}
    with pytest.raises(ConfigError, match="train.micro_batch_size=1: the evaluator stage's contrastive loss needs at "
                                          "least 2 images per step across its 1 rank"):
        ContrastiveStage(_config("evaluator", checkpoint["tmp"], tiny_shards, ["train.micro_batch_size=1"]),
                         torch.device("cpu"))


def test_val_max_images_shares_sum_to_the_limit():
    from dico_scale.stages.base import val_share

    assert [val_share(7, 2, r) for r in (0, 1)] == [4, 3]  # 7, where each rank took 7 // 2 = 3 before
    assert [val_share(1, 4, r) for r in range(4)] == [1, 0, 0, 0]  # a rank with none reads nothing
    assert val_share(0, 2, 1) is None  # no limit
