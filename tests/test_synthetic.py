import hashlib
import io, json, multiprocessing as mp, random, re

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dico_scale.data import synthetic as syn

SMALL = dict(n_train=60, n_val=10, n_test=7, samples_per_shard=25)


def read_split(pattern):
    return list(wds.WebDataset(pattern, shardshuffle=False).decode("pil"))


def shard_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}


def test_deterministic(tmp_path):
    syn.write_synthetic_dataset(tmp_path / "a", seed=3, **SMALL)
    syn.write_synthetic_dataset(tmp_path / "b", seed=3, **SMALL)
    syn.write_synthetic_dataset(tmp_path / "c", seed=4, **SMALL)
    a, b, c = (shard_bytes(tmp_path / x) for x in "abc")
    assert list(a) == ["test-00000.tar", "train-00000.tar", "train-00001.tar", "train-00002.tar", "val-00000.tar"]
    assert a == b
    assert all(a[k] != c[k] for k in a)
    # each split has its own RNG: changing n_train leaves val/test untouched
    syn.write_synthetic_dataset(tmp_path / "d", seed=3, **{**SMALL, "n_train": 30})
    d = shard_bytes(tmp_path / "d")
    assert d["val-00000.tar"] == a["val-00000.tar"] and d["test-00000.tar"] == a["test-00000.tar"]


def test_read_back(tmp_path):
    patterns = syn.write_synthetic_dataset(tmp_path, seed=0, **SMALL)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert patterns["train"] == str(tmp_path.resolve() / "train-{00000..00002}.tar")
    assert manifest["args"]["n_train"] == 60
    for split in syn.SPLITS:
        samples = read_split(patterns[split])
        assert len(samples) == manifest["splits"][split]["num_samples"] == SMALL[f"n_{split}"]
        assert [s["__key__"] for s in samples] == [f"{split}_{i:06d}" for i in range(len(samples))]
        for s in samples:
            assert s["jpg"].size == (64, 64) and s["jpg"].mode == "RGB"
            caps = s["json"]
            assert isinstance(caps, list) and len(caps) == 5
            for c in caps:
                assert isinstance(c, str) and c and len(c.split()) <= syn.MAX_WORDS
                assert re.fullmatch(r"[a-z ,:]+", c), c  # lowercase words, no digits


def test_grounding():
    rng = random.Random(123)
    colours, shapes = set(syn.COLOURS), set(syn.SHAPES)
    for _ in range(30):
        scene = syn.make_scene(rng, 64)
        caps = syn.scene_captions(scene, rng)
        words = [set(re.findall(r"[a-z]+", c)) for c in caps]
        for w in words:  # no caption mentions a colour or shape that is not drawn
            assert w & colours <= {s.colour for s in scene.shapes}
            assert w & shapes <= {s.shape for s in scene.shapes}
        for s in scene.shapes:  # every drawn shape is named, with its colour, in some caption
            assert any(f"{s.colour} {s.shape}" in c for c in caps)
        if len(scene.shapes) < 3:  # the first caption locates every shape
            assert all(s.loc in caps[0] for s in scene.shapes)
        # pixel at each shape centre has that shape's colour after a JPEG round trip
        buf = io.BytesIO()
        syn.draw_scene(scene).save(buf, "JPEG", quality=90, subsampling=0)
        px = np.asarray(Image.open(buf).convert("RGB")).astype(int)
        for s in scene.shapes:
            got = px[int(s.cy), int(s.cx)]
            dist = {name: np.abs(got - np.array(rgb)).max() for name, rgb in syn.COLOURS.items()}
            assert min(dist, key=dist.get) == s.colour and dist[s.colour] < 60, (s, got)


def test_diversity():
    rng = random.Random(0)
    samples = [syn.render_sample(rng, 64)[1] for _ in range(200)]
    assert len({caps[0] for caps in samples}) > 150
    assert len({c for caps in samples for c in caps}) > 800
    assert all(len(set(caps)) == 5 for caps in samples)
    for size in (32, 256):  # image size is configurable
        assert syn.render_sample(rng, size)[0].size == (size, size)


LOCK = f".synthetic-{hashlib.sha1(b'ds').hexdigest()[:16]}.lock"  # beside the set, fixed-length


def test_ensure_reuses_and_regenerates(tmp_path, capsys):
    out = tmp_path / "ds"
    p1 = syn.ensure_synthetic_dataset(out, **SMALL)
    assert capsys.readouterr().out == f"dico_scale: generating the synthetic set in {out}\n"
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (tmp_path / LOCK).unlink()
    p2 = syn.ensure_synthetic_dataset(out, **SMALL)
    assert p1 == p2 and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert not (tmp_path / LOCK).exists() and capsys.readouterr().out == ""  # a complete set: no lock, no word
    p3 = syn.ensure_synthetic_dataset(out, **{**SMALL, "n_train": 10})
    assert capsys.readouterr().out == (f"dico_scale: replacing the synthetic set in {out} (n_train "
                                       f"{SMALL['n_train']} -> 10)\n")
    assert p3["train"] == str(out.resolve() / "train-00000.tar")
    assert len(read_split(p3["train"])) == 10
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test-00000.tar", "train-00000.tar", "val-00000.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOCK, "ds"])  # no temp folders left behind


def test_set_folder_names_the_shard_patterns_can_carry(tmp_path):
    """Brace, glob and pipe characters would expand in the patterns built from the folder; a 250-byte name (the lock
    beside it was '.<name>.lock', past the 255 a file name may have) is fine."""
    for name in ("br{a,b}", "co::lon", "st*r"):
        with pytest.raises(ValueError, match="which the shard patterns built from it would expand"):
            syn.ensure_synthetic_dataset(tmp_path / name / "data", **SMALL)
    syn.ensure_synthetic_dataset(tmp_path / ("L" * 250), **SMALL)


def _counting_write(*args, **kwargs):  # patched in before fork: counts how many processes generate
    with open(kwargs.pop("_counter"), "a") as f:
        f.write("x")
    return _real_write(*args, **kwargs)


_real_write = syn.write_synthetic_dataset


def _ensure_worker(out, counter, q):
    syn.write_synthetic_dataset = lambda *a, **k: _counting_write(*a, _counter=counter, **k)
    q.put(syn.ensure_synthetic_dataset(out, **{**SMALL, "n_train": 300}))


def test_ensure_concurrent(tmp_path):
    ctx = mp.get_context("fork")
    out, counter, q = tmp_path / "ds", tmp_path / "count", ctx.Queue()
    procs = [ctx.Process(target=_ensure_worker, args=(out, counter, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert counter.read_text() == "x"  # exactly one process generated, the other waited and reused
    assert results[0] == results[1]
    assert len(read_split(results[0]["train"])) == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOCK, "count", "ds"])


@pytest.mark.parametrize("name,value", [("n_train", -1), ("n_val", -5), ("image_size", 16), ("samples_per_shard", 0),
                                        ("jpeg_quality", 101)])
def test_bad_arguments(tmp_path, capsys, name, value):
    with pytest.raises(ValueError, match=name):
        syn.write_synthetic_dataset(tmp_path, **{name: value})
    with pytest.raises(ValueError, match=name):
        syn.ensure_synthetic_dataset(tmp_path / "x", **{name: value})
    assert syn.main([str(tmp_path / "y"), "--" + name.replace("_", "-"), str(value)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dico_scale.data.synthetic: error: {name} must be"), err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli(tmp_path, capsys):
    syn.main([str(tmp_path / "ds"), "--n-train", "5", "--n-val", "2", "--n-test", "0", "--seed", "7"])
    lines = capsys.readouterr().out.split("\n")
    assert lines[0] == f"train {(tmp_path / 'ds').resolve() / 'train-00000.tar'}"
    assert lines[2] == "test "  # empty split: no shards
    assert len(read_split(str(tmp_path / "ds" / "train-00000.tar"))) == 5


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    """A folder that cannot be written, a foreign non-empty folder: one line, no traceback (sizes: above)."""
    (tmp_path / "a_file").write_text("")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("mine")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    cases = {"/proc/none": "No such file or directory", str(tmp_path / "a_file"): "is a file, not a folder",
             str(tmp_path / "foreign"): "holds files that are not a synthetic set this generator wrote; refusing to "
                                        "replace them",
             str(tmp_path / "loop" / "ds"): "runs into a symlink loop", "": "no folder given for the synthetic set"}
    for out, message in cases.items():
        for force in ([], ["--force"]) if "symlink" in message or not out else ([],):  # --force writes into the rest
            assert syn.main([out, *force]) == 2, out
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("dico_scale.data.synthetic: error: ") and message in err[0], err
    assert (tmp_path / "foreign" / "x.txt").read_text() == "mine"


def test_only_a_set_the_generator_wrote_is_ever_replaced(tmp_path):
    """A folder with a manifest.json of another kind (write_shards' shards, a web app's), one that is not JSON, or a
    set of ours beside a user's file, is never replaced by a set made with other arguments: the trainer names
    data.root in one line, and nothing is deleted."""
    from dico_scale.config import ConfigError, load_config
    from dico_scale.data.splits import data_shards

    theirs = {"shards": {"manifest.json": json.dumps({"splits": {"train": {"shards": ["train-000000.tar"]}}}),
                         "train-000000.tar": "tar"},
              "app": {"manifest.json": json.dumps({"name": "my web app"}), "thesis.tex": "thesis"},
              "broken": {"manifest.json": "{broken"}, "list": {"manifest.json": "[1, 2]"}}
    for name, files in theirs.items():
        for f, text in files.items():
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / f).write_text(text)
    ours = tmp_path / "ours"
    syn.ensure_synthetic_dataset(ours, **SMALL)
    (ours / "notes.txt").write_text("mine")
    for name in [*theirs, "ours"]:
        before = {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()}
        cfg = load_config("configs/demo/xe.yaml", [f"data.root={tmp_path / name}", "data.synthetic.n_train=20",
                                                   "evaluator.weights=", "captioner.image_encoder_weights="])
        with pytest.raises(ConfigError) as e:
            data_shards(cfg)
        assert str(e.value) == (f"bad value for config key 'data.root': '{tmp_path / name}' holds files that are not "
                                "a synthetic set this generator wrote; refusing to replace them (generate it into a "
                                "folder of its own)")
        assert {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()} == before
    (ours / "notes.txt").unlink()  # its own set alone: replaced by one of the new arguments
    assert syn.ensure_synthetic_dataset(ours, **{**SMALL, "n_train": 10})["train"] == str(ours / "train-00000.tar")

