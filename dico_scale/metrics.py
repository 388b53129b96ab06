"""Caption metrics: the COCO set through pycocoevalcap, CLIP-based scores, retrieval with the captions, statistics.

Definitions follow the official tools (the README section "Evaluation, inference and export" gives the evidence):
  CLIP-S  = 2.5 * max(cos(image, caption), 0)                       (jmhessel/clipscore, w = 2.5)
  PAC-S   = 2.0 * max(cos(image, caption), 0)                       (aimagelab/pacscore, w = 2.0)
  Ref-X   = harmonic mean of X and max(max_r cos(caption, reference r), 0); the text-text cosine is not scaled by w.
"""
from __future__ import annotations

import contextlib
import io
import os
import re

import torch

COCO_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
SCORE_NAMES = {"clips": ("CLIP-S", "RefCLIP-S"), "pacs": ("PAC-S", "RefPAC-S")}
RECALL_KS = (1, 5, 10)
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")  # spice-1.0.jar's Class-Path


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


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


def coco_scores(records: list[dict], spice: bool = True) -> tuple[dict, dict]:
    """({metric: corpus score or None}, {metric: one-line error}); each scorer fails alone."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    scores, errors = dict.fromkeys(COCO_METRICS), {}
    try:
        tok = PTBTokenizer()
        gts = tok.tokenize({r["key"]: [{"caption": c} for c in r["refs"]] for r in records})
        res = tok.tokenize({r["key"]: [{"caption": r["caption"]}] for r in records})
    except Exception as e:
        return scores, {"PTBTokenizer": _one_line(e)}
    for r in records:  # an empty caption may leave no line behind
        res.setdefault(r["key"], [""])
    scorers = [(Bleu, ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]), (Meteor, ["METEOR"]), (Rouge, ["ROUGE-L"]),
               (Cider, ["CIDEr"])]
    if spice:
        missing = spice_missing()
        if missing:
            errors["SPICE"] = missing
        else:
            from pycocoevalcap.spice.spice import Spice
            scorers.append((Spice, ["SPICE"]))
    for cls, names in scorers:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internals
                score, _ = cls().compute_score(gts, res)
        except Exception as e:
            errors[names[0] if len(names) == 1 else "BLEU"] = _one_line(e)
            continue
        values = score if isinstance(score, list) else [score]
        scores.update({n: float(v) for n, v in zip(names, values)})
    return scores, errors


# ---- CLIP-based scores and retrieval ---------------------------------------------------------------------------------

@torch.no_grad()
def text_features(evaluator, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Normalised float32 features [N, D] on the CPU; each distinct text is encoded once, so equal texts get
    bitwise-equal rows (retrieval ties then do not depend on batch composition)."""
    unique = sorted(set(texts))
    index = {t: i for i, t in enumerate(unique)}
    parts = [evaluator.text_features(unique[i:i + batch_size]).cpu() for i in range(0, len(unique), batch_size)]
    feats = torch.cat(parts) if parts else torch.zeros(0, 1)
    return feats[torch.tensor([index[t] for t in texts], dtype=torch.long)]


def harmonic_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2ab / (a + b), 0 where both are 0 (the official code would give NaN there)."""
    total = a + b
    return torch.where(total > 0, 2 * a * b / total.clamp(min=1e-12), torch.zeros_like(total))


@torch.no_grad()
def clip_scores(evaluator, image_feats: torch.Tensor, captions: list[str], refs: list[list[str]],
                weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: (weight * max(cos(image, caption), 0), the Ref- variant, caption features [N, D]).

    image_feats are normalised [N, D]. The evaluator's caption prefix goes on captions and references alike, as in
    both official tools (their caption dataset class serves both).
    """
    cand = text_features(evaluator, captions)
    img = image_feats.float().cpu()
    score = weight * (img * cand).sum(-1).clamp(min=0)
    flat = [r for rs in refs for r in rs]
    owner = torch.tensor([i for i, rs in enumerate(refs) for _ in rs], dtype=torch.long)
    ref_cos = (cand[owner] * text_features(evaluator, flat)).sum(-1)
    best = torch.full((len(captions),), float("-inf")).scatter_reduce(0, owner, ref_cos, "amax")
    return score, harmonic_mean(score, best.clamp(min=0)), cand


def recall_at_k(image_feats: torch.Tensor, text_feats: torch.Tensor, ks=RECALL_KS) -> dict[str, float]:
    """Text-to-image and image-to-text recall@k, caption i belonging to image i.

    Ties count against the match (rank = number of others scoring >= it): two images with the same caption are
    never told apart. Columns of equal captions are copies of one column, so ties are exact.
    """
    unique, inverse = torch.unique(text_feats.double(), dim=0, return_inverse=True)
    sims = (image_feats.double() @ unique.T)[:, inverse]  # [images, captions]
    own = sims.diagonal()
    n = sims.size(0)
    t2i_rank = (sims >= own.unsqueeze(0)).sum(0) - 1  # per caption: images scoring at least its own image
    i2t_rank = (sims >= own.unsqueeze(1)).sum(1) - 1  # per image: captions scoring at least its own caption
    out = {}
    for k in ks:
        out[f"t2i_R{k}"] = float((t2i_rank < k).double().mean()) if n else float("nan")
        out[f"i2t_R{k}"] = float((i2t_rank < k).double().mean()) if n else float("nan")
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
    """vocab_size, mean_length (words), novelty (share of captions, normalised, not among the training captions;
    None without them) and repeat_n (share of captions repeating some n-gram within themselves)."""
    toks = [words(c) for c in captions]
    n = max(1, len(toks))
    out = {"vocab_size": len({w for t in toks for w in t}), "mean_length": sum(map(len, toks)) / n,
           "novelty": None if seen is None else sum(" ".join(t) not in seen for t in toks) / n}
    for k in ngrams:
        out[f"repeat_{k}"] = sum(has_repeat(t, k) for t in toks) / n
    return out
