"""Streaming loaders over real tar shards: batch layout, rank/worker splitting, fault skipping; validation metrics."""
import math
import tarfile

import pytest
import torch
import webdataset as wds

from dico_scale.data.pipeline import Collate, eval_loader, train_loader
from dico_scale.data.synthetic import write_synthetic_dataset
from dico_scale.data.tokenizer import CaptionTokenizer
from dico_scale.models.clip import create_clip

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer()


@pytest.fixture(scope="module")
def preprocess():
    return create_clip("dico-tiny")[1]  # the real open_clip eval transform of the tiny tower (64 px)


def collate(preprocess, tok, seed=0, eval_preprocess=None):
    return Collate(preprocess, eval_preprocess, tok, MAX_TOKENS, seed=seed)


def set_rank(monkeypatch, rank, world):
    """webdataset reads RANK / WORLD_SIZE from the environment when no process group is initialised."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


def all_keys(spec):
    return [k for url in wds.shardlists.expand_urls(spec) for k in _tar_keys(url)]


def _tar_keys(path):
    with tarfile.open(path) as tar:
        return list(dict.fromkeys(m.name.rsplit(".", 1)[0] for m in tar.getmembers()))


def keys_of(loader):
    return [k for batch in loader for k in batch["keys"]]


# ---- train_loader ------------------------------------------------------------------------------------------------

def test_train_batches(tiny_shards, preprocess, tok, clean_env):
    loader, n = train_loader(tiny_shards["train"], collate(preprocess, tok), batch_size=4, samples_per_epoch=20,
                             world_size=1, num_workers=0, shuffle_buffer=20, seed=0)
    assert n == 5
    batches = list(loader)
    assert len(batches) == 5
    assert len(list(loader)) == 5  # the next epoch too
    known = set(all_keys(tiny_shards["train"]))
    verbatim = 0
    for b in batches:
        assert set(b) == {"pixels", "refs", "keys", "captions", "tokens", "data_stats"}
        assert set(b["data_stats"]) <= {"read"}  # clean data: reads, no fault
        assert b["pixels"].shape == (4, 3, 64, 64) and b["pixels"].dtype == torch.float32
        assert torch.isfinite(b["pixels"]).all() and b["pixels"].std() > 0.1
        assert len(b["refs"]) == 4 and all(len(r) == 5 and all(isinstance(c, str) and c for c in r)
                                           for r in b["refs"])
        assert len(b["keys"]) == 4 and set(b["keys"]) <= known
        t = b["tokens"]
        assert t.dtype == torch.long and t.dim() == 2 and t.size(0) == 4 and t.size(1) <= MAX_TOKENS
        assert (t[:, 0] == tok.bos).all()
        for row, refs, picked in zip(t.tolist(), b["refs"], b["captions"]):
            assert picked in refs and tok.decode(row) == tok.decode(tok.encode(picked, MAX_TOKENS))
            end = row.index(tok.eos)
            assert all(x == tok.pad for x in row[end + 1:]) and tok.pad not in row[:end]
            caption = tok.decode(row)
            assert caption in {tok.decode(tok.encode(r, MAX_TOKENS)) for r in refs}
            verbatim += caption in {r.lower() for r in refs}
        assert (t == tok.pad).any() or t.size(1) == MAX_TOKENS  # padded to the longest row
    assert verbatim > 0  # captions without punctuation come back verbatim


def test_train_eval_preprocess(tiny_shards, preprocess, tok, clean_env):
    from torchvision import transforms

    eval_pp = transforms.Compose([transforms.Resize(32), transforms.ToTensor()])
    loader, _ = train_loader(tiny_shards["train"], collate(preprocess, tok, eval_preprocess=eval_pp), 2, 2, 1, 0, 4, 0)
    (b,) = list(loader)
    assert b["eval_pixels"].shape == (2, 3, 32, 32) and b["pixels"].shape == (2, 3, 64, 64)


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """24 training shards of 4 samples, so two ranks' shard draws rarely collide."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("many"), seed=1, n_train=96, n_val=0, n_test=0,
                                   samples_per_shard=4)["train"]


def _rank_keys(monkeypatch, spec, preprocess, tok, rank, seed, world=2):
    set_rank(monkeypatch, rank, world)
    loader, n = train_loader(spec, collate(preprocess, tok, seed=seed + rank), batch_size=4,
                             samples_per_epoch=32, world_size=world, num_workers=0, shuffle_buffer=8, seed=seed)
    batches = list(loader)
    assert n == 4 and len(batches) == n
    return [k for b in batches for k in b["keys"]]


def test_train_ranks_read_different_samples(many_shards, preprocess, tok, clean_env, monkeypatch):
    r0 = _rank_keys(monkeypatch, many_shards, preprocess, tok, 0, seed=5)
    r1 = _rank_keys(monkeypatch, many_shards, preprocess, tok, 1, seed=5)
    assert len(r0) == len(r1) == 16
    overlap = set(r0) & set(r1)
    assert len(overlap) <= 4, f"ranks read the same samples: {sorted(overlap)}"
    # deterministic: the same seed gives the same keys in the same order
    assert _rank_keys(monkeypatch, many_shards, preprocess, tok, 0, seed=5) == r0
    # another epoch seed gives another order
    other = _rank_keys(monkeypatch, many_shards, preprocess, tok, 0, seed=6)
    assert other != r0


def test_train_ranks_disjoint_over_seeds(many_shards, preprocess, tok, clean_env, monkeypatch):
    """Summed over several epochs the overlap stays far below what one shared stream (100 %) would give."""
    shared = total = 0
    for seed in (11, 12, 13):
        r0 = _rank_keys(monkeypatch, many_shards, preprocess, tok, 0, seed=seed)
        r1 = _rank_keys(monkeypatch, many_shards, preprocess, tok, 1, seed=seed)
        shared += len(set(r0) & set(r1))
        total += len(set(r0))
    # Resampling with replacement: each rank draws ~5 of the 24 shards, so ~1 shard (4 keys) per epoch is shared.
    assert shared <= total // 2


# ---- eval_loader -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eval_splits(tmp_path_factory):
    one = write_synthetic_dataset(tmp_path_factory.mktemp("one_shard"), n_train=0, n_val=7, n_test=0,
                                  samples_per_shard=16)["val"]
    four = write_synthetic_dataset(tmp_path_factory.mktemp("four_shards"), n_train=0, n_val=10, n_test=0,
                                   samples_per_shard=3)["val"]
    assert len(wds.shardlists.expand_urls(one)) == 1 and len(wds.shardlists.expand_urls(four)) == 4
    return {"one": one, "four": four}


@pytest.mark.parametrize("split", ["one", "four"])
@pytest.mark.parametrize("workers", [0, 2])
def test_eval_loader_every_sample_once(eval_splits, split, workers, preprocess, tok, clean_env, monkeypatch):
    spec = eval_splits[split]
    expected = all_keys(spec)
    assert len(expected) == (7 if split == "one" else 10)
    seen = []
    for rank in (0, 1):
        set_rank(monkeypatch, rank, 2)
        batches = list(eval_loader(spec, collate(preprocess, tok), batch_size=2, num_workers=workers))
        assert all(1 <= len(b["keys"]) <= 2 for b in batches)
        seen += keys_of(batches)
    assert sorted(seen) == sorted(expected), "every key exactly once over the ranks"


@pytest.mark.parametrize("split", ["one", "four"])
def test_eval_loader_one_rank_with_workers(eval_splits, split, preprocess, tok, clean_env):
    spec = eval_splits[split]
    keys = keys_of(eval_loader(spec, collate(preprocess, tok), batch_size=3, num_workers=2))
    assert sorted(keys) == sorted(all_keys(spec))
    keys0 = keys_of(eval_loader(spec, collate(preprocess, tok), batch_size=3, num_workers=0))
    assert keys0 == all_keys(spec)  # one reader: shard order, nothing dropped, a partial last batch kept


def test_eval_loader_few_shards_split_by_sample(eval_splits, preprocess, tok, clean_env):
    """One shard, two workers: both workers get a share (strided samples), not one worker everything."""
    spec = eval_splits["one"]
    batches = [b["keys"] for b in eval_loader(spec, collate(preprocess, tok), batch_size=2, num_workers=2)]
    order = {k: i for i, k in enumerate(all_keys(spec))}
    readers = {order[b[0]] % 2 for b in batches}
    assert readers == {0, 1}
    assert all(len({order[k] % 2 for k in b}) == 1 for b in batches), batches


# ---- shard checks, resume position, per-reader shuffling ----------------------------------------------------------

def test_check_local_shards(tiny_shards, tmp_path):
    from dico_scale.config import ConfigError
    from dico_scale.data.pipeline import check_local_shards

    train, val = wds.shardlists.expand_urls(tiny_shards["train"]), wds.shardlists.expand_urls(tiny_shards["val"])
    gone = str(tmp_path / "gone-{0..1}.tar")
    spec = "::".join([tiny_shards["train"], gone, "pipe:cat /nowhere.tar", "https://example.invalid/a.tar",
                      tiny_shards["val"]])
    kept, missing = check_local_shards(spec)
    assert missing == [str(tmp_path / "gone-0.tar"), str(tmp_path / "gone-1.tar")]
    assert kept == train + ["pipe:cat /nowhere.tar", "https://example.invalid/a.tar"] + val  # remote: read time
    with pytest.raises(ConfigError) as e:
        check_local_shards(gone, "data.train_shards")
    assert str(e.value) == f"bad value for config key 'data.train_shards': no shard of '{gone}' exists"


def _epoch_keys(spec, preprocess, tok, start_batch=0, seed=3):
    loader, n = train_loader(spec, collate(preprocess, tok), batch_size=4, samples_per_epoch=24, world_size=1,
                             num_workers=0, shuffle_buffer=16, seed=seed, start_batch=start_batch)
    batches = list(loader)
    assert len(batches) == n
    return [b["keys"] for b in batches]


def test_resume_inside_an_epoch_yields_only_the_remaining_batches(tiny_shards, preprocess, tok, clean_env):
    full = _epoch_keys(tiny_shards["train"], preprocess, tok)
    assert len(full) == 6 and _epoch_keys(tiny_shards["train"], preprocess, tok) == full  # reproducible
    rest = _epoch_keys(tiny_shards["train"], preprocess, tok, start_batch=2)
    assert len(rest) == 4
    assert rest != full[2:] and rest[0] != full[0]  # freshly shuffled, not a replay of the epoch's start
    assert _epoch_keys(tiny_shards["train"], preprocess, tok, start_batch=2) == rest
    assert _epoch_keys(tiny_shards["train"], preprocess, tok, start_batch=6) == []


def test_clean_data_reports_reads_and_no_faults(tiny_shards, preprocess, tok, clean_env):
    loader, n = train_loader(tiny_shards["train"], collate(preprocess, tok), batch_size=4, samples_per_epoch=32,
                             world_size=1, num_workers=2, shuffle_buffer=8, seed=0)
    stats = [b["data_stats"] for b in loader]
    assert len(stats) == n == 8
    # decoding follows the shuffle buffer and wds.batched reads one sample ahead: one extra per worker
    assert sum(s.get("read", 0) for s in stats) == 32 + 2
    assert not any(set(s) - {"read"} for s in stats)


class CountingCollate(Collate):
    """Counts the batches built in any process (a shared-memory counter inherited by the forked workers)."""

    def __init__(self, counter, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counter = counter

    def __call__(self, samples):
        with self.counter.get_lock():
            self.counter.value += 1
        return super().__call__(samples)


def test_workers_build_exactly_the_epochs_batches(tiny_shards, preprocess, tok, clean_env):
    """7 batches over 2 workers (4 + 3): none built ahead and thrown away at the epoch's end."""
    import multiprocessing

    built = multiprocessing.Value("i", 0)
    loader, n = train_loader(tiny_shards["train"], CountingCollate(built, preprocess, None, tok, MAX_TOKENS, seed=0),
                             batch_size=4, samples_per_epoch=28, world_size=1, num_workers=2, shuffle_buffer=8, seed=0)
    assert n == 7 and len(list(loader)) == 7
    assert built.value == 7


def _shuffled(monkeypatch, rank, worker, seed=7):
    from dico_scale.data.pipeline import _reader_shuffle

    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("WORKER", str(worker))
    monkeypatch.setenv("NUM_WORKERS", "2")
    return list(_reader_shuffle(50, seed)(iter(range(200))))


def test_shuffle_differs_per_rank_and_worker_and_reproduces(monkeypatch, clean_env):
    orders = {(r, w): _shuffled(monkeypatch, r, w) for r in (0, 1) for w in (0, 1)}
    assert all(sorted(o) == list(range(200)) for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) == 4  # no two readers shuffle alike
    assert _shuffled(monkeypatch, 1, 0) == orders[1, 0]  # the same (seed, rank, worker): the same order
    assert _shuffled(monkeypatch, 1, 0, seed=8) != orders[1, 0]


# ---- validate ----------------------------------------------------------------------------------------------------

REFS = {
    "img1": ["a red circle at the top left", "a large red circle", "there is a red circle at the top left"],
    "img2": ["a blue square on the right", "a small blue square", "the blue square is on the right"],
    "img3": ["two shapes: a green star and a yellow cross", "a green star and a yellow cross",
             "from left to right: a green star and a yellow cross"],
}


def test_cider_prefers_matching_captions():
    from dico_scale.validate import cider

    good = [{"key": k, "caption": refs[0], "refs": refs, "score": None} for k, refs in REFS.items()]
    bad = [{"key": k, "caption": "the weather is nice in spring", "refs": refs, "score": None}
           for k, refs in REFS.items()]
    cg, cb = cider(good), cider(bad)
    assert cg > 1.0 and cb < 0.1 and cg > cb
    assert math.isnan(cider([]))


def test_gather_records_without_process_group():
    from dico_scale.validate import gather_records

    recs = [{"key": "c", "caption": "x", "refs": [], "score": 1.0},
            {"key": "a", "caption": "y", "refs": [], "score": 2.0},
            {"key": "b", "caption": "z", "refs": [], "score": 3.0},
            {"key": "a", "caption": "y", "refs": [], "score": 2.0}]
    out = gather_records(recs)
    assert [r["key"] for r in out] == ["a", "b", "c"]
    assert [r["caption"] for r in out] == ["y", "z", "x"]
    assert gather_records([]) == []


def test_caption_metrics_average_scores():
    from dico_scale.validate import caption_metrics

    recs = [{"key": k, "caption": refs[0], "refs": refs, "score": s}
            for (k, refs), s in zip(REFS.items(), [0.5, 1.0, 2.25])]
    recs.append({"key": "img4", "caption": "a cyan cross", "refs": ["a cyan cross"], "score": None})
    m = caption_metrics(recs)
    assert set(m) == {"cider", "images", "evaluator_score", "mean_length", "repetition", "vocab_size"}
    assert m["images"] == 4.0 and m["cider"] > 1.0
    assert m["evaluator_score"] == pytest.approx(3.75 / 3)  # the record without a score is left out
