"""Caption metrics: the COCO set through pycocoevalcap, CLIP-based scores, retrieval recall, statistics.

The one implementation of each metric: in-loop validation (`dico_scale.validate`, the stages' `validate`) and
`dico_scale.evaluate` both call these functions, so the numbers of one checkpoint are the same in both.
Definitions follow the official tools (docs/evaluation.md gives the evidence):
  CIDEr   = pycocoevalcap's Cider (CIDEr-D) after its PTBTokenizer; an empty caption is scored as the empty string
  CLIP-S  = 2.5 * max(cos(image, caption), 0)                       (jmhessel/clipscore, w = 2.5)
  PAC-S   = 2.0 * max(cos(image, caption), 0)                       (aimagelab/pacscore, w = 2.0)
  Ref-X   = harmonic mean of X and max(max_r cos(caption, reference r), 0); the text-text cosine is not scaled by w.
  R@k     = share of queries whose match is among the first k of a stable descending sort of the similarities
            (open_clip's `get_clip_metrics` with ties broken by index: the first of equal-scored items ranks first)
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re

import torch

from .errors import first_line

COCO_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
SCORE_NAMES = {"clips": ("CLIP-S", "RefCLIP-S"), "pacs": ("PAC-S", "RefPAC-S")}
RECALL_KS = (1, 5, 10)
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")  # spice-1.0.jar's Class-Path


def mean(values) -> float:
    """The mean of a metric over images (NaN for none): exact summation, so the order of the images does not matter."""
    values = list(values)
    return math.fsum(values) / len(values) if values else float("nan")


# ---- COCO metrics (pycocoevalcap, PTB tokenizer) ---------------------------------------------------------------------

def spice_lib() -> str:
    import pycocoevalcap.spice.spice as spice

    return os.path.join(os.path.dirname(os.path.abspath(spice.__file__)), "lib")


def spice_missing(lib: str | None = None) -> str | None:
    """One line naming the CoreNLP jars SPICE lacks and how to provide them, or None when they are all there.

    pycocoevalcap would otherwise try to download them on first use, which hangs or fails without a network.
    """
    lib = lib or spice_lib()
    missing = [j for j in SPICE_JARS if not os.path.isfile(os.path.join(lib, j))]
    if not missing:
        return None
    return (f"SPICE skipped: missing {', '.join(missing)} in {lib}; run `python -m pycocoevalcap.spice."
            f"get_stanford_models` with network access, or copy both jars from stanford-corenlp-full-2015-12-09.zip "
            f"(nlp.stanford.edu/software) into that folder")


def ptb_tokenize(records: list[dict]) -> tuple[dict, dict]:
    """(references, candidates) by key after pycocoevalcap's PTBTokenizer (lower case, punctuation removed), as
    coco-caption tokenises them. An empty caption (or one of punctuation only) stays the empty string: it is scored
    as such (CIDEr 0), never replaced by a placeholder word."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({r["key"]: [{"caption": c} for c in r["refs"]] for r in records})
    res = tok.tokenize({r["key"]: [{"caption": r["caption"]}] for r in records})
    for r in records:  # an empty caption may leave no line behind
        res.setdefault(r["key"], [""])
    return gts, res


def cider_score(gts: dict, res: dict) -> float:
    """Corpus CIDEr-D of tokenised captions (pycocoevalcap's Cider: n = 4, sigma = 6, document frequencies from the
    references given)."""
    from pycocoevalcap.cider.cider import Cider

    return float(Cider().compute_score(gts, res)[0])


def cider(records: list[dict]) -> float:
    """CIDEr of records {key, caption, refs} over the whole split; NaN for no records. The CIDEr of coco_scores."""
    if not records:
        return float("nan")
    return cider_score(*ptb_tokenize(records))


def meteor_score(gts: dict, res: dict) -> float:
    """Corpus METEOR (pycocoevalcap's Meteor), its java child ended and reaped whatever happens. Meteor.compute_score
    takes a lock that an exception inside it (Ctrl-C, java gone) leaves held, and Meteor.__del__ takes that lock
    first: the process would hang in the finalizer forever (and java stay a zombie)."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        return scorer.compute_score(gts, res)[0]
    finally:
        if scorer.lock.locked():  # compute_score was left midway: free the lock its __del__ will take
            scorer.lock.release()
        proc = scorer.meteor_p
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):  # java gone: a write still buffered cannot be flushed
                pipe.close()


def coco_scores(records: list[dict], spice: bool = True) -> tuple[dict, dict]:
    """({metric: corpus score or None}, {metric: one-line error}); each scorer fails alone."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    scores, errors = dict.fromkeys(COCO_METRICS), {}
    try:
        gts, res = ptb_tokenize(records)
    except Exception as e:
        return scores, {"PTBTokenizer": first_line(e, 300)}
    scorers = [(lambda g, r: Bleu(4).compute_score(g, r)[0], ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]),
               (meteor_score, ["METEOR"]),
               (lambda g, r: Rouge().compute_score(g, r)[0], ["ROUGE-L"]), (cider_score, ["CIDEr"])]
    if spice:
        missing = spice_missing()
        if missing:
            errors["SPICE"] = missing
        else:
            from pycocoevalcap.spice.spice import Spice
            scorers.append((lambda g, r: Spice().compute_score(g, r)[0], ["SPICE"]))
    for fn, names in scorers:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internals
                score = fn(gts, res)
        except Exception as e:
            errors[names[0] if len(names) == 1 else "BLEU"] = first_line(e, 300)
            continue
        values = score if isinstance(score, list) else [score]
        scores.update({n: float(v) for n, v in zip(names, values)})
    return scores, errors


# ---- CLIP-based scores and retrieval ---------------------------------------------------------------------------------

@torch.no_grad()
def text_features(evaluator, texts: list[str], batch_size: int = 256, prefix: str | None = None) -> torch.Tensor:
    """Normalised float32 features [N, D] on the CPU; each distinct text is encoded once, in sorted batches, so equal
    texts get bitwise-equal rows (retrieval ties then are exact) and the features do not depend on how the split was
    batched or sharded. `prefix` replaces the evaluator's own caption prefix (None: keep it)."""
    unique = sorted(set(texts))
    index = {t: i for i, t in enumerate(unique)}
    own = evaluator.prefix
    if prefix is not None:
        evaluator.prefix = prefix
    try:
        parts = [evaluator.text_features(unique[i:i + batch_size]).cpu() for i in range(0, len(unique), batch_size)]
    finally:
        evaluator.prefix = own
    feats = torch.cat(parts) if parts else torch.zeros(0, 1)
    return feats[torch.tensor([index[t] for t in texts], dtype=torch.long)]


def harmonic_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2ab / (a + b), 0 where both are 0 (the official code would give NaN there)."""
    total = a + b
    return torch.where(total > 0, 2 * a * b / total.clamp(min=1e-12), torch.zeros_like(total))


def clip_score(image_feats: torch.Tensor, text_feats: torch.Tensor, weight: float) -> torch.Tensor:
    """Per row: weight * max(cos(image, text), 0) of normalised features (CLIP-S, PAC-S, the in-loop evaluator
    score), float32 on the CPU."""
    return weight * (image_feats.float().cpu() * text_feats.float().cpu()).sum(-1).clamp(min=0)


@torch.no_grad()
def clip_scores(evaluator, image_feats: torch.Tensor, captions: list[str], refs: list[list[str]],
                weight: float, prefix: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: (weight * max(cos(image, caption), 0), the Ref- variant, caption features [N, D]).

    image_feats are normalised [N, D]. The caption prefix (the evaluator's, or `prefix`) goes on captions and
    references alike, as in both official tools (their caption dataset class serves both).
    """
    cand = text_features(evaluator, captions, prefix=prefix)
    score = clip_score(image_feats, cand, weight)
    flat = [r for rs in refs for r in rs]
    owner = torch.tensor([i for i, rs in enumerate(refs) for _ in rs], dtype=torch.long)
    ref_cos = (cand[owner] * text_features(evaluator, flat, prefix=prefix)).sum(-1)
    best = torch.full((len(captions),), float("-inf")).scatter_reduce(0, owner, ref_cos, "amax")
    return score, harmonic_mean(score, best.clamp(min=0)), cand


def match_ranks(sims: torch.Tensor) -> torch.Tensor:
    """Per row i: the position of column i (its match) in a stable descending sort of the row, i.e. the number of
    columns scoring strictly higher plus the equal-scored columns before it. `torch.argsort(sims, descending=True,
    stable=True)` gives the same positions (open_clip's get_clip_metrics, with its ties broken by index)."""
    own = sims.diagonal().unsqueeze(1)
    idx = torch.arange(sims.size(1))
    before = idx.unsqueeze(0) < torch.arange(sims.size(0)).unsqueeze(1)
    return (sims > own).sum(1) + ((sims == own) & before).sum(1)


def recall_at_k(image_feats: torch.Tensor, text_feats: torch.Tensor, ks=RECALL_KS) -> dict[str, float]:
    """Text-to-image and image-to-text recall@k, caption i belonging to image i: the share of queries whose match
    ranks below k (match_ranks: ties broken by index, the earlier item first; m images with one same caption make
    one image-to-text hit at R@1, not m, nor none).

    Similarities in float64; equal feature rows (e.g. equal captions, see text_features) are one row, so their ties
    are exact and do not depend on matmul blocking.
    """
    if len(image_feats) == 0:
        return {f"{d}_R{k}": float("nan") for k in ks for d in ("t2i", "i2t")}
    img, img_inv = torch.unique(image_feats.double().cpu(), dim=0, return_inverse=True)
    txt, txt_inv = torch.unique(text_feats.double().cpu(), dim=0, return_inverse=True)
    sims = (img @ txt.T)[img_inv][:, txt_inv]  # [images, captions]
    t2i_rank, i2t_rank = match_ranks(sims.T), match_ranks(sims)
    out = {}
    for k in ks:
        out[f"t2i_R{k}"] = float((t2i_rank < k).double().mean())
        out[f"i2t_R{k}"] = float((i2t_rank < k).double().mean())
    return out


# ---- caption statistics ----------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-cased words without punctuation: the unit of every statistic below."""
    return _WORD.findall(text.lower())


def normalise(text: str) -> str:
    return " ".join(words(text))


def has_repeat(tokens: list[str], n: int) -> bool:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


def caption_stats(captions: list[str], seen: set[str] | None = None, ngrams=(1, 2, 3, 4)) -> dict:
    """vocab_size, mean_length (words), repetition (share of captions repeating a phrase of two or more words
    within themselves: "a red circle and a red circle"; one repeated word such as "a" does not count), novelty
    (share of captions, normalised, not among the training captions; None without them) and repeat_n (share of
    captions repeating some n-gram within themselves)."""
    toks = [words(c) for c in captions]
    n = max(1, len(toks))
    out = {"vocab_size": len({w for t in toks for w in t}), "mean_length": sum(map(len, toks)) / n,
           "repetition": sum(has_repeat(t, 2) for t in toks) / n,
           "novelty": None if seen is None else sum(" ".join(t) not in seen for t in toks) / n}
    for k in ngrams:
        out[f"repeat_{k}"] = sum(has_repeat(t, k) for t in toks) / n
    return out
