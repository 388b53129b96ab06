"""CIDEr-D fast enough to be a per-step training reward, equal to pycocoevalcap's CiderScorer.

pycocoevalcap (cider/cider_scorer.py) re-counts every reference's n-grams and rebuilds their tf-idf dicts on each call
and takes its document frequencies (df) from the set it scores. Here the df are fixed at construction (from the
training split's references, as self-critical.pytorch does, or from the scored set for pycocoevalcap's own mode),
n-grams get integer ids, each reference set's tf-idf vectors are cached (references repeat across steps) and a whole
batch of candidate/reference dot products is one sorted-key join in numpy. The arithmetic is pycocoevalcap's, quirks
included: ref_len = log(number of images), idf = ref_len - log(max(1, df)), the clipped dot product
sum min(v_hyp, v_ref) * v_ref / (|v_hyp| |v_ref|), a Gaussian length penalty (sigma = 6) whose "length" is the
number of *bigrams* (counts2vec counts term frequencies of index n == 1), the mean over n = 1..4 and references, x10.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter, OrderedDict
from itertools import repeat
from typing import Callable, Iterable

import numpy as np
import torch

from .base import Reward

log = logging.getLogger(__name__)

DF_VERSION = 1

# ---- tokenisation ------------------------------------------------------------------------------------------------
# coco-caption runs Stanford's PTBTokenizer (-lowerCase) and then drops the tokens in PUNCTUATIONS
# (pycocoevalcap/tokenizer/ptbtokenizer.py). This regex does the same to ordinary captions without a JVM; checked
# against the Java tokenizer in tests/test_cider.py. Known differences: abbreviations other than "x.y." ("mr."),
# multi-symbol runs ("?!") and symbols glued to words ("#1", "@home").
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...",
                ";", '"'}  # '"' because PTB rewrites it to `` or '' before the filter
# PTB escapes brackets; lowercased, "-lrb-" no longer matches the uppercase "-LRB-" of the list, so it stays.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# numbers "3.5" "1,000" "12:30" | "u.s." "e.g." | clitics written apart ("dog 's") | words "t-shirt" "o'clock" "and/or"
# (clitics split afterwards) | any other symbol, dropped when in PUNCTUATIONS
_TOKEN = re.compile(r"\d+(?:[.,:]\d+)+|(?:[^\W\d_]\.){2,}|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-'/]\w+)*|[^\w\s]")
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)$")
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "wanna": ("wan", "na"), "gotta": ("got", "ta")}


def ptb_tokenize(caption: str) -> list[str]:
    """Lowercase tokens of `caption` as coco-caption's PTBTokenizer + punctuation filter give them."""
    out = []
    for tok in _TOKEN.findall(caption.lower()):
        if tok in PUNCTUATIONS:
            continue
        tok = _BRACKETS.get(tok, tok)
        m = _CLITIC.search(tok)
        if m:  # "isn't" -> "is n't", "dog's" -> "dog 's" (but "o'clock" stays)
            out += (tok[:m.start()], m.group(1))
        else:
            out += _SPLIT_WORDS.get(tok, (tok,))
    return out


def _tokenizer_name(tokenize: Callable | None) -> str:
    return "split" if tokenize is None else getattr(tokenize, "__name__", repr(tokenize))


def _ngram_counts(words: list[str], n: int) -> list[Counter]:
    """Per order k-1: {"w1 w2 ... wk": count}; the joined string is as unique as pycocoevalcap's tuple (no spaces)."""
    return [Counter(words)] + [Counter(map(" ".join, zip(*(words[i:] for i in range(k))))) for k in range(2, n + 1)]


# ---- document frequencies and their cache ------------------------------------------------------------------------

def document_frequencies(refs_iter: Iterable[list[str]], n: int = 4,
                         tokenize: Callable[[str], list[str]] | None = ptb_tokenize) -> dict:
    """{"version", "n", "tokenizer", "n_images", "df": {ngram: number of images whose references contain it}}."""
    split = tokenize or str.split
    df: dict[str, int] = {}
    n_images = 0
    for refs in refs_iter:
        n_images += 1
        seen = set()
        for r in refs:
            for c in _ngram_counts(split(r), n):
                seen.update(c)
        for g in seen:
            df[g] = df.get(g, 0) + 1
    return {"version": DF_VERSION, "n": n, "tokenizer": _tokenizer_name(tokenize), "n_images": n_images, "df": df}


def load_or_build_df(cache_path: str, refs_iter_factory: Callable[[], Iterable[list[str]]], n: int = 4,
                     tokenize: Callable[[str], list[str]] | None = ptb_tokenize) -> dict:
    """The cached document_frequencies() payload at `cache_path`, built and written atomically when absent, stale
    (other version, n or tokenizer) or unreadable; a bad file costs one warning line, never a traceback."""
    want = {"version": DF_VERSION, "n": n, "tokenizer": _tokenizer_name(tokenize)}
    if os.path.exists(cache_path):
        try:
            with open(cache_path, encoding="utf-8") as f:
                payload = json.load(f)
            if {k: payload.get(k) for k in want} != want:
                raise ValueError(f"made with {({k: payload.get(k) for k in want})}, want {want}")
            if not isinstance(payload["df"], dict) or not int(payload["n_images"]) > 0:
                raise ValueError("no document frequencies in it")
            return payload
        except Exception as e:  # corrupt, truncated, foreign: rebuilding is always correct
            msg = (str(e).splitlines() or [""])[0][:200]
            log.warning("CIDEr-D df cache %s unusable (%s: %s); rebuilding it", cache_path, type(e).__name__, msg)
    payload = document_frequencies(refs_iter_factory(), n, tokenize)
    tmp = f"{cache_path}.tmp.{os.getpid()}"  # per process: ranks building at once never share a half-written file
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache_path)  # readers see the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return payload


# ---- the scorer --------------------------------------------------------------------------------------------------

class CiderD:
    """CIDEr-D with fixed document frequencies: `score` (one candidate per image, like pycocoevalcap) and
    `score_groups` (k candidates per image, the reward's shape)."""

    def __init__(self, df: dict[str, float], n_images: int, n: int = 4, sigma: float = 6.0,
                 tokenize: Callable[[str], list[str]] | None = ptb_tokenize, cache_size: int = 20_000):
        self.n, self.sigma, self.cache_size = n, sigma, cache_size
        self.split = tokenize or str.split
        self.ref_len = float(np.log(float(n_images)))
        self._ids = {g: i for i, g in enumerate(df)}
        # idf per id; reference n-grams unseen in df get ids later (weight ref_len); the last slot serves id -1, the
        # candidate n-grams no reference has (they only add to the candidate's norm).
        self._idf = [self.ref_len - float(np.log(max(1.0, float(d)))) for d in df.values()]
        self._idf_np = np.array(self._idf + [self.ref_len])
        self._refs: OrderedDict[tuple, tuple] = OrderedDict()  # LRU of reference sets' vectors

    @classmethod
    def from_corpus(cls, references: Iterable[list[str]], n: int = 4, **kw) -> "CiderD":
        """df from `references` (a training split, or the scored set: pycocoevalcap's own mode)."""
        p = document_frequencies(references, n, kw.get("tokenize", ptb_tokenize))
        return cls(p["df"], p["n_images"], n=n, **kw)

    @classmethod
    def from_payload(cls, payload: dict, **kw) -> "CiderD":
        return cls(payload["df"], payload["n_images"], n=payload["n"], **kw)

    def _entries(self, texts: list[str], grow: bool) -> tuple[np.ndarray, ...]:
        """(id, order, tf, text index) per n-gram of `texts`, and each text's length; id -1: not in the table."""
        ids, order, tf, which, lengths = [], [], [], [], []
        for t, text in enumerate(texts):
            words = self.split(text)
            for k, c in enumerate(_ngram_counts(words, self.n)):
                if grow:  # reference n-grams unseen in df: new ids of weight ref_len, so that candidates match them
                    for g in c:
                        if g not in self._ids:
                            self._ids[g] = len(self._idf)
                            self._idf.append(self.ref_len)
                ids += map(self._ids.get, c, repeat(-1, len(c)))
                order += [k] * len(c)
                tf += c.values()
                which += [t] * len(c)
            lengths.append(max(len(words) - 1, 0) if self.n >= 2 else 0)  # pycocoevalcap's "length": bigram count
        if grow and len(self._idf) + 1 != len(self._idf_np):
            self._idf_np = np.array(self._idf + [self.ref_len])
        ids = np.array(ids, np.int64)
        return (ids, np.array(order, np.int64), np.array(tf, np.float64) * self._idf_np[ids], np.array(which, np.int64),
                np.array(lengths, np.float64))

    def _ref_set(self, refs: list[str]) -> tuple:
        """(keys sorted: ref * 2^32 + id, tf-idf weights, norms [R, n], lengths [R]) for one image's references."""
        key = tuple(refs)
        hit = self._refs.get(key)
        if hit is not None:
            self._refs.move_to_end(key)
            return hit
        ids, orders, w, ref, lengths = self._entries(refs, grow=True)
        norms = np.sqrt(np.bincount(ref * self.n + orders, w * w, len(refs) * self.n)).reshape(-1, self.n)
        keys = (ref << 32) + ids
        srt = np.argsort(keys)
        keys, w = keys[srt], w[srt]
        hit = (keys, w, norms, lengths)
        self._refs[key] = hit
        if len(self._refs) > self.cache_size:
            self._refs.popitem(last=False)
        return hit

    def _score(self, candidates: list[str], group: list[int], references: list[list[str]]) -> np.ndarray:
        """CIDEr-D of candidates[c] against references[group[c]]."""
        if any(len(r) == 0 for r in references):
            raise ValueError("CIDEr-D needs at least one reference per image")
        sets = [self._ref_set(r) for r in references]
        n_refs = np.array([len(r) for r in references], np.int64)
        ref_off = np.concatenate([[0], np.cumsum(n_refs)])  # first global reference of each image
        # sorted keys of all reference n-grams, plus a sentinel so that every searchsorted position is valid
        rkeys = np.concatenate([(ref_off[b] << 32) + s[0] for b, s in enumerate(sets)] + [[np.iinfo(np.int64).max]])
        rw = np.concatenate([s[1] for s in sets] + [[0.0]])
        rnorm = np.concatenate([s[2] for s in sets])
        rlen = np.concatenate([s[3] for s in sets])

        ids, order, w, cand, clen = self._entries(candidates, grow=False)
        group = np.asarray(group, np.int64)
        C = len(candidates)
        cnorm = np.sqrt(np.bincount(cand * self.n + order, w * w, C * self.n)).reshape(C, self.n)

        # every (candidate, reference of its image) pair, candidate-major
        pairs_per_cand = n_refs[group]
        pair_off = np.concatenate([[0], np.cumsum(pairs_per_cand)])
        P = int(pair_off[-1])
        pair_cand = np.repeat(np.arange(C), pairs_per_cand)
        pair_ref = ref_off[group][pair_cand] + np.arange(P) - pair_off[pair_cand]  # global reference index

        # join each candidate n-gram with the same n-gram of each of its image's references (one searchsorted)
        e = np.flatnonzero(ids >= 0)  # n-grams no reference has cannot match
        rep = pairs_per_cand[cand[e]]
        e_rep = np.repeat(e, rep)
        j = np.arange(len(e_rep)) - np.repeat(np.cumsum(rep) - rep, rep)
        pair = pair_off[cand[e_rep]] + j
        q = (pair_ref[pair] << 32) + ids[e_rep]
        pos = np.searchsorted(rkeys, q)
        hit = rkeys[pos] == q
        vr, vh = rw[pos[hit]], w[e_rep[hit]]
        # float64 also when nothing matches: bincount of no entries is an int array, which divide cannot write into
        dot = np.bincount(pair[hit] * self.n + order[e_rep[hit]], np.minimum(vh, vr) * vr,
                          P * self.n).astype(np.float64).reshape(P, self.n)

        den = cnorm[pair_cand] * rnorm[pair_ref]
        val = np.divide(dot, den, out=dot.copy(), where=den != 0)  # pycocoevalcap divides only when both norms != 0
        delta = clen[pair_cand] - rlen[pair_ref]
        val *= np.e ** (-(delta ** 2) / (2 * self.sigma ** 2))[:, None]
        per_cand = np.add.reduceat(val, pair_off[:-1], axis=0) if P else np.zeros((C, self.n))
        return per_cand.mean(axis=1) / pairs_per_cand * 10.0

    def score(self, candidates: list[str], references: list[list[str]]) -> np.ndarray:
        """Per image CIDEr-D of candidates[i] against references[i] (pycocoevalcap's per-image array)."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates for {len(references)} reference sets")
        return self._score(candidates, list(range(len(candidates))), references)

    def score_groups(self, candidates: list[list[str]], references: list[list[str]]) -> torch.Tensor:
        """[B, k] float64: CIDEr-D of candidates[b][i] against references[b]."""
        if len(candidates) != len(references) or len({len(c) for c in candidates}) > 1:
            raise ValueError("need one list of k candidates per reference set, the same k for every image")
        k = len(candidates[0]) if candidates else 0
        flat = [c for cs in candidates for c in cs]
        s = self._score(flat, [b for b in range(len(candidates)) for _ in range(k)], references)
        return torch.from_numpy(s).reshape(len(candidates), k)


def cider_d(candidates: list[str], references: list[list[str]], **kw) -> tuple[float, np.ndarray]:
    """pycocoevalcap's Cider().compute_score: df from the scored references; (mean, per image)."""
    s = CiderD.from_corpus(references, **kw).score(candidates, references)
    return float(s.mean()), s


# ---- the training reward -----------------------------------------------------------------------------------------

def training_references(urls: list[str]) -> Iterable[list[str]]:
    """Each training image's reference list, from the shards' .json members only (no image is decoded). A shard
    that cannot be read costs one warning line; the data pipeline counts such faults when it trains on them."""
    import webdataset as wds

    for url in urls:
        try:
            stream = wds.gopen(url)
            try:
                for member in wds.tariterators.tar_file_iterator(stream):
                    if not member["fname"].endswith(".json"):
                        continue
                    try:
                        refs = json.loads(member["data"])
                    except ValueError:
                        continue
                    if isinstance(refs, list) and refs and all(isinstance(r, str) and r.strip() for r in refs):
                        yield refs
            finally:
                stream.close()
        except Exception as e:
            log.warning("CIDEr-D df: skipping shard %s (%s: %s)", url, type(e).__name__, str(e).splitlines()[0][:200])


def df_cache_path(urls: list[str], fallback_dir: str) -> str:
    """Beside the first local shard (the output directory when none is local or that folder is read-only), named by
    a digest of the shard list with each local shard's size and mtime: another split or rewritten shards miss it."""
    import hashlib

    from ..data.pipeline import is_local

    ident = []
    for u in urls:
        st = os.stat(u) if is_local(u) and os.path.exists(u) else None
        ident.append([u, st.st_size, st.st_mtime_ns] if st else [u])
    name = f"cider_df-{hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:12]}.json"
    local = [u for u in urls if is_local(u)]
    folder = os.path.dirname(os.path.abspath(local[0])) if local else ""
    return os.path.join(folder if folder and os.access(folder, os.W_OK) else fallback_dir, name)


def training_df(cfg) -> dict:
    """The document frequencies of the training split's references, built once (rank 0, the others wait at a
    barrier, then read the cache) and cached beside the shards for later runs."""
    import torch.distributed as dist

    from ..data.splits import split_shards

    urls, _ = split_shards(cfg, "train", log_missing=False)
    path = df_cache_path(urls, cfg.train.output_dir)
    grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if grouped and dist.get_rank() != 0:
        dist.barrier()  # rank 0 builds or checks the cache first
        return load_or_build_df(path, lambda: training_references(urls))
    payload = load_or_build_df(path, lambda: training_references(urls))
    if grouped:
        dist.barrier()
    return payload


class CiderReward(Reward):
    """CIDEr-D of each candidate against its image's references, df from the training split (as self-critical.pytorch
    computes its CIDEr-D reward); ignores the pixels."""
    name = "cider"

    def __init__(self, scorer: CiderD):
        self.scorer = scorer

    @classmethod
    def build(cls, cfg, evaluator=None, clamp: bool = False) -> "CiderReward":
        return cls(CiderD.from_payload(training_df(cfg)))

    def __call__(self, pixels: torch.Tensor, captions: list[list[str]], refs: list[list[str]]) -> torch.Tensor:
        return self.scorer.score_groups(captions, refs).to(pixels.device, torch.float32)
