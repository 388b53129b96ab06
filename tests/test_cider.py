"""CIDEr-D reward (dico_scale/rewards/cider.py): equal to pycocoevalcap's CiderScorer, batched, cached, fast."""
import json
import logging
import os
import random
import shutil
import time

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider_scorer import CiderScorer

from dico_scale.rewards.cider import CiderD, cider_d, document_frequencies, load_or_build_df, ptb_tokenize

# already tokenised (lowercase, no punctuation) as pycocoevalcap expects; exact comparisons use tokenize=None
REFS = [
    ["a man riding a wave on top of a surfboard", "a surfer rides a large wave in the ocean",
     "a person on a surfboard riding a wave", "a man surfing on a big wave", "surfer in the water riding a wave"],
    ["a dog sitting on a couch", "a brown dog lying on a sofa", "the dog is resting on the couch"],
    ["two cats sleeping on a bed"],  # a single reference
    ["a plate of food with broccoli and rice", "a white plate topped with broccoli rice and meat",
     "food on a plate on a table", "a close up of a plate of food"],
    ["a red bus driving down a city street", "a double decker bus on the road", "a bus parked near a sidewalk"],
    ["a red bus driving down a city street", "a double decker bus on the road", "a bus parked near a sidewalk"],
]
CANDS = [
    "a man riding a wave on top of a surfboard",  # identical to a reference
    "",  # empty
    "cat cat cat cat cat cat",  # repeated words
    # longer than its references
    "a plate of food with broccoli and rice and meat on a white table next to a glass of water and a fork on it",
    "zebra xylophone quantum banana",  # n-grams no reference or df has
    "a bus a bus a bus on the street",
]
TRAIN = [  # a separate "training split": some evaluated n-grams are missing from its df
    ["a man riding a wave", "a surfer on a wave", "a person surfing"],
    ["a dog on a couch", "a dog lying on a bed"],
    ["a cat sleeping on a bed", "two cats on a bed"],
    ["a plate of food", "broccoli and rice on a plate"],
    ["a bus on a street", "a red bus"],
    ["a man riding a horse", "a horse in a field"],
    ["a bus on a street", "a red bus"],
]


class _Len(list):
    """A list that reports another length: compute_cider takes ref_len = log(len(self.crefs))."""

    def __init__(self, items, n):
        super().__init__(items)
        self.n = n

    def __len__(self):
        return self.n


def theirs(cands, refs, train=None):
    """pycocoevalcap's per-image CIDEr-D; with `train`, its df and ref_len come from those reference sets."""
    sc = CiderScorer(n=4, sigma=6.0)
    for c, r in zip(cands, refs):
        sc += (c, r)
    if train is None:
        return sc.compute_score()[1]
    tr = CiderScorer(n=4, sigma=6.0)
    for r in train:
        tr.cook_append(None, r)
    tr.compute_doc_freq()
    sc.document_frequency = tr.document_frequency
    sc.crefs = _Len(sc.crefs, len(train))
    return np.array(sc.compute_cider())


def random_sets(seed, n_img, k=1, n_refs=5, length=20, vocab=300):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]

    def sent(n):  # skewed: common words give shared n-grams and non-trivial df
        return " ".join(rng.choice(words[:40] if rng.random() < 0.7 else words) for _ in range(n))

    refs = [[sent(rng.randint(length - 8, length + 4)) for _ in range(rng.randint(1, n_refs) if k == 1 else n_refs)]
            for _ in range(n_img)]
    cands = [[sent(rng.randint(0, length + 10) if k == 1 else length) for _ in range(k)] for _ in range(n_img)]
    return cands, refs


# ---- (a) equality with pycocoevalcap ------------------------------------------------------------------------------

def test_equals_pycocoevalcap_df_from_evaluated_set():
    ours = CiderD.from_corpus(REFS, tokenize=None).score(CANDS, REFS)
    ref = theirs(CANDS, REFS)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    assert ref[0] > 1 and ref[1] == 0 and ref[4] == 0  # the edge cases are exercised, not all zero
    mean, per_image = cider_d(CANDS, REFS, tokenize=None)
    assert abs(mean - ref.mean()) < 1e-6 and np.allclose(per_image, ref, atol=1e-6)


def test_equals_pycocoevalcap_df_from_training_corpus():
    scorer = CiderD.from_corpus(TRAIN, tokenize=None)
    ours = scorer.score(CANDS, REFS)
    ref = theirs(CANDS, REFS, train=TRAIN)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    assert not np.allclose(ref, theirs(CANDS, REFS))  # the df really differ
    np.testing.assert_allclose(scorer.score(CANDS, REFS), ours, rtol=0, atol=0)  # cached reference vectors: same


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_pycocoevalcap_random(seed):
    (cands, refs), (_, train) = random_sets(seed, 60), random_sets(seed + 100, 80)
    cands = [c[0] for c in cands]
    np.testing.assert_allclose(CiderD.from_corpus(refs, tokenize=None).score(cands, refs), theirs(cands, refs),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(CiderD.from_corpus(train, tokenize=None, cache_size=0).score(cands, refs),
                               theirs(cands, refs, train=train), rtol=0, atol=1e-6)


def test_rejects_an_image_without_references():
    with pytest.raises(ValueError, match="at least one reference"):
        CiderD.from_corpus(TRAIN, tokenize=None).score(["a dog"], [[]])


# ---- tokenisation ------------------------------------------------------------------------------------------------

CAPTIONS = ["A man riding a wave on top of a surfboard.", "The dog's toy, isn't it?",
            "Two people (a man and a woman) at the beach!", 'He said "hello" to the cat',
            "A black-and-white photo of a t-shirt...", "3.5 dogs and 1,000 cats; a man: here",
            "I can't do it -- won't", "A DOG'S bed -- Man's best friend", "dogs' bowls",
            "a man eating a hot-dog , with ketchup .",
            "it's 5 o'clock", "e.g. a U.S. flag", "cannot gonna wanna", "a 'quoted' word", "a man [in brackets]",
            "a man - woman", "the car's  wheels   are big", "a pizza w/ cheese and/or 50% off & $5",
            "I'm you're we've they'll he'd", "a 10-year-old boy at 12:30 pm", "café crème",
            "the dog 's bone is n't big"]


def test_ptb_tokenize_examples():  # outputs of pycocoevalcap's PTBTokenizer (Java), recorded
    assert ptb_tokenize("The dog's toy, isn't it?") == "the dog 's toy is n't it".split()
    assert ptb_tokenize("Two people (a man and a woman) at the beach!") == \
        "two people -lrb- a man and a woman -rrb- at the beach".split()
    assert ptb_tokenize("I can't do it -- won't") == "i ca n't do it wo n't".split()
    assert ptb_tokenize("A black-and-white photo of a t-shirt...") == "a black-and-white photo of a t-shirt".split()
    assert ptb_tokenize("3.5 dogs and 1,000 cats; e.g. a U.S. flag") == \
        "3.5 dogs and 1,000 cats e.g. a u.s. flag".split()


@pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer needs Java")
def test_ptb_tokenize_matches_the_java_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(CAPTIONS)})
    assert [" ".join(ptb_tokenize(c)) for c in CAPTIONS] == [java[i][0] for i in range(len(CAPTIONS))]


# ---- (b) batched groups ------------------------------------------------------------------------------------------

def test_score_groups_shape_and_order():
    cands, refs = random_sets(3, 6, k=4)
    scorer = CiderD.from_corpus(TRAIN + refs, tokenize=None)
    out = scorer.score_groups(cands, refs)
    assert out.shape == (6, 4) and out.dtype == torch.float64
    flat = scorer.score([c for cs in cands for c in cs], [r for r in refs for _ in range(4)])
    assert torch.equal(out, torch.from_numpy(flat).reshape(6, 4))
    rev = scorer.score_groups([cs[::-1] for cs in cands[::-1]], refs[::-1])  # order follows the input
    assert torch.allclose(rev, out.flip(0).flip(1), rtol=0, atol=1e-12)
    cands[2][1] = refs[2][0]  # a candidate equal to its first reference scores above the others of its image
    out = scorer.score_groups(cands, refs)
    assert out[2].argmax() == 1
    with pytest.raises(ValueError):
        scorer.score_groups([["a"], ["a", "b"]], refs[:2])


# ---- (c) the df cache ---------------------------------------------------------------------------------------------

def test_df_cache_round_trip_and_corrupt_rebuild(tmp_path, caplog):
    path = tmp_path / "shards" / "cider_df.json"
    calls = []

    def factory():
        calls.append(1)
        return iter(TRAIN)

    built = load_or_build_df(str(path), factory, tokenize=None)
    assert len(calls) == 1 and path.is_file() and built["n_images"] == len(TRAIN) and built["version"] == 1
    loaded = load_or_build_df(str(path), factory, tokenize=None)
    assert len(calls) == 1 and loaded == json.loads(json.dumps(built)) == json.loads(path.read_text())
    assert loaded == json.loads(json.dumps(document_frequencies(TRAIN, tokenize=None)))
    np.testing.assert_array_equal(CiderD.from_payload(loaded, tokenize=None).score(CANDS, REFS),
                                  CiderD.from_corpus(TRAIN, tokenize=None).score(CANDS, REFS))

    for bad in (b'{"version": 1, "df": {', b"\x00\xff not utf-8", json.dumps({**built, "version": 0}).encode(), b"[]"):
        path.write_bytes(bad)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dico_scale.rewards.cider"):
            again = load_or_build_df(str(path), factory, tokenize=None)
        assert again == loaded and json.loads(path.read_text()) == loaded
        assert len(caplog.records) == 1 and "rebuilding" in caplog.text and "\n" not in caplog.records[0].getMessage()
        assert caplog.records[0].exc_info is None
    assert len(calls) == 5 and sorted(os.listdir(path.parent)) == ["cider_df.json"]  # no tmp file left behind
    # another tokenizer is another df: rebuilt, not reused
    assert load_or_build_df(str(path), factory)["tokenizer"] == "ptb_tokenize" and len(calls) == 6


# ---- (d) speed -------------------------------------------------------------------------------------------------------

def test_faster_than_pycocoevalcap():
    B, k = 40, 5
    cands, refs = random_sets(7, B, k=k, n_refs=5, length=20)
    flat_c, flat_r = [c for cs in cands for c in cs], [r for r in refs for _ in range(k)]
    scorer = CiderD.from_corpus(random_sets(8, 500)[1] + refs, tokenize=None)

    def best(f, n):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return min(times)

    cold = best(lambda: scorer._refs.clear() or scorer.score_groups(cands, refs), 3)
    ours = best(lambda: scorer.score_groups(cands, refs), 5)
    ref = best(lambda: theirs(flat_c, flat_r), 3)
    print(f"\nCIDEr-D on {B}x{k} candidates, 5 refs of ~20 tokens: ours {ours * 1e3:.1f} ms (reference vectors "
          f"cached), {cold * 1e3:.1f} ms (uncached); pycocoevalcap CiderScorer {ref * 1e3:.1f} ms")
    assert cold < ref and ours < ref / 3


def test_a_batch_where_no_candidate_n_gram_matches_scores_zero():
    """No candidate shares an n-gram with its references: every score is 0, as in pycocoevalcap (an int array from
    numpy's bincount of nothing once broke the division)."""
    refs = [["a dog on a couch"], ["a cat on a bed", "two cats"]]
    got = CiderD.from_corpus(refs, tokenize=None).score_groups([["zebra"], [""]], refs)
    assert got.dtype == torch.float64 and torch.equal(got, torch.zeros(2, 1, dtype=torch.float64))
    assert np.array_equal(theirs(["zebra", ""], refs), [0.0, 0.0])
