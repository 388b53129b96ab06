"""Shard writer: a Karpathy-format fixture and a jsonl source round-trip through the writer and the real loader."""
import hashlib
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import open_clip
import pytest
import webdataset as wds
import yaml
from PIL import Image

from dico_scale.data.pipeline import Collate, eval_loader
from dico_scale.data.tokenizer import CaptionTokenizer
from dico_scale.data.write_shards import LOCK, ShardSink, brace_spec, main, parser

SIZES = [(320, 240), (240, 320), (200, 150), (150, 200), (256, 256), (300, 100),
         (100, 300), (180, 120), (120, 180), (224, 168), (168, 224), (288, 216)]
SPLITS = ["train"] * 5 + ["restval"] * 3 + ["val"] * 2 + ["test"] * 2


def _jpeg(path, size, seed):
    rng = random.Random(seed)
    im = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)).resize(size)
    im.save(path, "JPEG", quality=85)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """dataset_coco.json + 12 real JPEGs under train2014/ and val2014/: {"file", "root", "images": [...]}."""
    root = tmp_path_factory.mktemp("coco")
    images, sentid = [], 1000
    for i, (size, split) in enumerate(zip(SIZES, SPLITS)):
        folder = "train2014" if split == "train" else "val2014"
        name = f"COCO_{folder}_{i:012d}.jpg"
        (root / folder).mkdir(exist_ok=True)
        _jpeg(root / folder / name, size, i)
        sents = [{"raw": f"image {i} caption {j} ", "sentid": sentid + j, "imgid": i} for j in range(5)]
        images.append({"filepath": folder, "filename": name, "split": split, "imgid": i, "cocoid": 500 + i,
                       "sentids": [s["sentid"] for s in sents], "sentences": sents})
        sentid += 5
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return {"file": str(root / "dataset_coco.json"), "root": str(root), "images": images}


def write(src, out, *extra, workers=1):
    per_shard = [] if "--samples-per-shard" in extra else ["--samples-per-shard", "2"]  # an option is given once
    args = ["karpathy", "--split-file", src["file"], "--image-root", src["root"], "--out", str(out),
            *per_shard, "--workers", str(workers), "--no-progress", *extra]
    assert main(args) == 0
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def collate():
    return Collate(open_clip.image_transform(32, is_train=False), None, CaptionTokenizer(), 24, seed=0)


def read(spec, collate, workers=0):
    """{key: refs} of everything eval_loader yields, checking no key comes twice."""
    got = {}
    for batch in eval_loader(spec, collate, 3, num_workers=workers):
        assert batch["pixels"].shape[1:] == (3, 32, 32)
        for k, refs in zip(batch["keys"], batch["refs"]):
            assert k not in got
            got[k] = refs
    return got


def tar_members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def expected(src, fold_restval=True):
    """{split: {key: captions}} from the fixture itself."""
    out = {}
    for im in src["images"]:
        split = "train" if fold_restval and im["split"] == "restval" else im["split"]
        out.setdefault(split, {})[f"coco-{im['cocoid']}"] = [s["raw"].strip() for s in im["sentences"]]
    return out


def test_image_layout_round_trip(coco, collate, tmp_path):
    m = write(coco, tmp_path)
    want = expected(coco)
    assert list(m["splits"]) == ["train", "val", "test"] and m["skipped"] == []
    for split, refs in want.items():
        s = m["splits"][split]
        got = read(str(tmp_path / s["spec"]), collate)
        assert got == refs  # every caption of every image, under its stable key
        assert s["images"] == s["samples"] == len(got) and s["captions"] == 5 * len(got)
        names = sorted(f for f in os.listdir(tmp_path) if f.startswith(split + "-"))
        assert [f["name"] for f in s["files"]] == names == wds.shardlists.expand_urls(s["spec"])
        assert s["shards"] == len(names) == (len(refs) + 1) // 2
        for f in s["files"]:
            data = (tmp_path / f["name"]).read_bytes()
            assert f["bytes"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert m["splits"]["train"]["images"] == 8  # 5 train + 3 restval folded in
    # plain RGB JPEGs within the default --max-side (640) are copied byte for byte
    first = tar_members(tmp_path / "train-000000.tar")
    assert first["coco-500.jpg"] == (Path(coco["root"]) / coco["images"][0]["filepath"] /
                                     coco["images"][0]["filename"]).read_bytes()
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == [LOCK]  # no temporary files left


def test_caption_layout_restval_separate(coco, collate, tmp_path):
    m = write(coco, tmp_path, "--layout", "caption", "--restval", "separate")
    assert list(m["splits"]) == ["train", "restval", "val", "test"]
    sentids = {f"coco-{im['cocoid']}-s{s['sentid']}": [s["raw"].strip()] for im in coco["images"]
               for s in im["sentences"]}
    for split, refs in expected(coco, fold_restval=False).items():
        s = m["splits"][split]
        got = read(str(tmp_path / s["spec"]), collate)
        assert len(got) == s["samples"] == s["captions"] == 5 * s["images"] == 5 * len(refs)
        assert all(got[k] == sentids[k] for k in got)
        assert {k.rsplit("-s", 1)[0] for k in got} == set(refs)
    assert m["splits"]["restval"]["images"] == 3 and m["splits"]["train"]["images"] == 5


def test_max_side_resizes(coco, tmp_path):
    m = write(coco, tmp_path, "--max-side", "100", "--quality", "80", "--splits", "val,test")
    assert list(m["splits"]) == ["val", "test"] and m["options"]["max_side"] == 100
    sizes = {f"coco-{im['cocoid']}": SIZES[i] for i, im in enumerate(coco["images"])}
    seen = 0
    for split in ("val", "test"):
        for f in m["splits"][split]["files"]:
            for name, data in tar_members(tmp_path / f["name"]).items():
                if name.endswith(".jpg"):
                    w, h = sizes[name[:-4]]
                    im = Image.open(io.BytesIO(data))
                    assert im.format == "JPEG" and max(im.size) == 100
                    assert im.size == (round(w * 100 / max(w, h)), round(h * 100 / max(w, h)))
                    seen += 1
    assert seen == 4


def test_output_independent_of_workers_and_order(coco, tmp_path):
    one = write(coco, tmp_path / "w1", "--max-side", "120")
    two = write(coco, tmp_path / "w2", "--max-side", "120", workers=2)
    assert one["splits"] == two["splits"]  # same shard names, bytes and sha256
    # the same source in reverse order gives the same keys with the same content
    rev = dict(coco, file=str(tmp_path / "rev.json"))
    (tmp_path / "rev.json").write_text(json.dumps({"images": coco["images"][::-1], "dataset": "coco"}))
    three = write(rev, tmp_path / "rev", "--max-side", "120")

    def content(out, m):
        return {k: v for s in m["splits"].values() for f in s["files"] for k, v in tar_members(out / f["name"]).items()}
    assert content(tmp_path / "rev", three) == content(tmp_path / "w1", one)


def test_bad_items_skipped_and_listed(coco, collate, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(coco["root"], src)
    images = json.loads((src / "dataset_coco.json").read_text())["images"]
    os.remove(src / images[0]["filepath"] / images[0]["filename"])  # missing
    bad = src / images[8]["filepath"] / images[8]["filename"]
    bad.write_bytes(bad.read_bytes()[:300])  # truncated JPEG: header fine, decode fails
    images[9]["sentences"] = [{"raw": "  ", "sentid": 1}]  # no usable caption
    (src / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    m = write({"file": str(src / "dataset_coco.json"), "root": str(src)}, tmp_path / "out")
    reasons = {x["key"]: x["reason"] for x in m["skipped"]}
    assert reasons["coco-500"] == "missing image file"
    assert reasons["coco-508"].startswith("unreadable image") and reasons["coco-509"] == "no captions"
    assert len(reasons) == 3 and m["splits"]["train"]["skipped"] == 1 and m["splits"]["val"]["skipped"] == 2
    want = expected(coco)
    assert read(str(tmp_path / "out" / m["splits"]["train"]["spec"]), collate).keys() == set(want["train"]) - {"coco-500"}
    assert m["splits"]["val"]["images"] == 0 and m["splits"]["val"]["shards"] == 0
    assert m["splits"]["test"]["images"] == 2


def test_jsonl_source(coco, collate, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _jpeg(imgs / "a.b.jpg", (90, 60), 1)  # dotted stem: the key must not contain the dot
    Image.new("RGB", (50, 70), (10, 200, 30)).save(imgs / "p.png")  # a PNG is re-encoded as JPEG
    absolute = os.path.join(coco["root"], coco["images"][0]["filepath"], coco["images"][0]["filename"])
    rows = [{"image": "a.b.jpg", "captions": ["one", "two"]},
            {"image": "p.png", "captions": ["green"], "id": "img/7", "split": "val"},
            {"image": absolute, "captions": ["abs path", "", "kept"], "split": "val"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["jsonl", "--input", str(tmp_path / "pairs.jsonl"), "--image-root", str(imgs), "--out",
                 str(tmp_path / "out"), "--no-progress", "--layout", "caption"]) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["source"]["kind"] == "jsonl" and m["skipped"] == []
    assert read(str(tmp_path / "out" / m["splits"]["train"]["spec"]), collate) == {"a_b-s0": ["one"], "a_b-s1": ["two"]}
    stem = os.path.splitext(coco["images"][0]["filename"])[0]
    assert read(str(tmp_path / "out" / m["splits"]["val"]["spec"]), collate) == {
        "img_7-s0": ["green"], f"{stem}-s0": ["abs path"], f"{stem}-s2": ["kept"]}
    png = tar_members(tmp_path / "out" / "val-000000.tar")["img_7-s0.jpg"]
    assert Image.open(io.BytesIO(png)).format == "JPEG"


def test_pipe_and_joined_specs(coco, collate, tmp_path):
    """Remote-style specs the docs show: a `pipe:` command with brace expansion, and sources joined with '::'."""
    m = write(coco, tmp_path)
    train = expected(coco)["train"]
    assert m["splits"]["train"]["shards"] == 4
    got = read(f"pipe:cat {tmp_path}/train-{{000000..000003}}.tar", collate, workers=2)
    assert got == train
    part = read(f"pipe:cat {tmp_path}/train-{{000000..000001}}.tar", collate)
    assert len(part) == 4 and set(part) < set(train)
    joined = read(f"{tmp_path}/{m['splits']['val']['spec']}::pipe:cat {tmp_path}/{m['splits']['test']['spec']}", collate)
    assert joined.keys() == expected(coco)["val"].keys() | expected(coco)["test"].keys()


def test_max_shard_size(coco, tmp_path):
    m = write(coco, tmp_path, "--samples-per-shard", "100", "--max-shard-size", "300KB", "--splits", "train")
    files = m["splits"]["train"]["files"]
    assert len(files) > 1 and sum(f["samples"] for f in files) == 8
    assert all(f["bytes"] <= 300_000 for f in files)


def test_unfinished_shard_never_has_a_final_name(coco, tmp_path):
    sink = ShardSink(str(tmp_path), "train", 10, 10**9)
    sink.write("k1", b"\xff\xd8 not checked here", b'["a"]')
    assert os.listdir(tmp_path) == [".train-000000.tar.tmp"]  # a crash now leaves only the temporary file
    write(coco, tmp_path, "--splits", "test", "--overwrite")  # a rerun clears it
    assert sorted(os.listdir(tmp_path)) == [LOCK, "manifest.json", "test-000000.tar"]


def _error(capsys, args):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("write_shards: error:")
    return err


def test_cli_errors(coco, tmp_path, capsys):
    def karpathy(out=tmp_path / "o"):
        return ["karpathy", "--image-root", coco["root"], "--out", str(out), "--no-progress", "--split-file"]

    def jsonl(name):
        return ["jsonl", "--input", str(tmp_path / name), "--out", str(tmp_path / "o")]

    k = karpathy()
    assert "split file not found" in _error(capsys, k + [str(tmp_path / "nope.json")])
    (tmp_path / "bad.json").write_text('{"images": [')
    assert "bad.json is not valid JSON" in _error(capsys, k + [str(tmp_path / "bad.json")])
    (tmp_path / "other.json").write_text('{"annotations": []}')
    assert "not a Karpathy split file" in _error(capsys, k + [str(tmp_path / "other.json")])
    assert "unknown split 'dev'" in _error(capsys, k + [coco["file"], "--splits", "train,dev"])
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _error(capsys, ["karpathy", "--image-root", str(empty), "--out", str(tmp_path / "o"), "--split-file",
                          coco["file"]])
    assert "no images found" in err and str(empty) in err
    (tmp_path / "p.jsonl").write_text('{"image": "a.jpg", "captions": ["x"]}\n{"image": "b.jpg"}\n')
    assert "p.jsonl line 2" in _error(capsys, ["jsonl", "--input", str(tmp_path / "p.jsonl"), "--out", str(empty)])
    (tmp_path / "bin.jsonl").write_bytes(b'{"image": "a.jpg", "captions": ["x"]}\n\xff\xfe garbage\n')
    assert "bin.jsonl line 2: not UTF-8 text" in _error(capsys, jsonl("bin.jsonl"))
    (tmp_path / "null.jsonl").write_text('{"image": "a.jpg", "captions": ["x"], "split": null}\n')
    assert "null.jsonl line 1: split null must be" in _error(capsys, jsonl("null.jsonl"))  # not a split 'None'
    for ident in ("null", "[1, 2]", "true"):  # not a key 'None', '1_2' or 'True'
        (tmp_path / "id.jsonl").write_text('{"image": "a.jpg", "captions": ["x"], "id": %s}\n' % ident)
        assert f"id.jsonl line 1: id {ident} must be a string or an integer" in _error(capsys, jsonl("id.jsonl"))
    for field, value in (("filename", None), ("filepath", 5), ("split", None)):  # os.path's TypeError before
        entry = {**coco["images"][0], field: value}
        (tmp_path / "typed.json").write_text(json.dumps({"images": coco["images"][:1] + [entry]}))
        assert f"typed.json: images[1] {field} is {json.dumps(value)}, not a string" in _error(
            capsys, k + [str(tmp_path / "typed.json")])
    assert "--out /proc/none cannot be created" in _error(capsys, karpathy("/proc/none") + [coco["file"]])
    write(coco, tmp_path / "done", "--splits", "test")
    assert "--overwrite" in _error(capsys, karpathy(tmp_path / "done") + [coco["file"]])
    write(coco, tmp_path / "done", "--splits", "val", "--overwrite")  # replaces the old shards
    assert sorted(os.listdir(tmp_path / "done")) == [LOCK, "manifest.json", "val-000000.tar"]


def test_a_second_writer_into_the_same_out_is_refused(coco, tmp_path, capsys):
    """While a write_shards holds --out, another one is refused in one line naming the holder (two at once mixed
    their shards under one manifest); afterwards the folder is free again. Odd --out paths are one line too."""
    import fcntl

    out = tmp_path / "o"
    args = ["karpathy", "--split-file", coco["file"], "--image-root", coco["root"], "--out", str(out), "--no-progress",
            "--splits", "test"]
    assert main(args) == 0
    with open(out / LOCK, "r+") as held:  # what a first writer, still running, holds
        fcntl.flock(held, fcntl.LOCK_EX)
        assert (out / LOCK).read_text() == f"pid {os.getpid()} on {socket.gethostname()}"
        assert _error(capsys, args + ["--overwrite"]) == (
            f"write_shards: error: --out {out} is being written by another write_shards right now (pid "
            f"{os.getpid()} on {socket.gethostname()}): wait for it, or write into another folder")
    assert main(args + ["--overwrite"]) == 0
    assert sorted(os.listdir(out)) == [LOCK, "manifest.json", "test-000000.tar"]

    def out_error(path):
        return _error(capsys, [str(path) if a == str(out) else a for a in args])

    assert "which the data.*_shards specs naming its shards would expand" in out_error(tmp_path / "q'o{a,b}")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "file").write_text("")
    assert out_error(tmp_path / "loop").endswith("cannot be created: it is a symlink that leads nowhere "
                                                 "(Too many levels of symbolic links)")
    assert out_error(tmp_path / "file").endswith("cannot be created: it is a file, not a folder")


def test_jsonl_line_endings_and_ids(tmp_path):
    """Unix, Windows and old-Mac line endings alike; an integer id is the key, a missing one the file name."""
    from dico_scale.data.sources import read_jsonl

    rows = [b'{"image": "a/cat.jpg", "captions": ["a cat"]}', b'{"image": "b.jpg", "captions": ["b"], "id": 7}',
            b'{"image": "c.jpg", "captions": [" c ", ""], "id": "x/9"}']
    for end in (b"\n", b"\r\n", b"\r"):
        (tmp_path / "p.jsonl").write_bytes(end.join(rows) + end + end)  # a blank last line too
        items = read_jsonl(str(tmp_path / "p.jsonl"), str(tmp_path))
        assert [(i.key, i.captions) for i in items] == [("cat", ["a cat"]), ("7", ["b"]), ("x_9", ["c"])], end


def test_module_cli(coco, tmp_path):
    """The real entry point: a summary with shell-quoted overrides on success, one stderr line and exit 2 on error."""
    cmd = [sys.executable, "-m", "dico_scale.data.write_shards", "karpathy", "--split-file", coco["file"],
           "--image-root", coco["root"], "--out", str(tmp_path), "--samples-per-shard", "3", "--workers", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"'data.train_shards={tmp_path}/train-{{000000..000002}}.tar'" in p.stdout
    assert f" data.val_shards={tmp_path}/val-000000.tar " in p.stdout and "8 images, 40 captions" in p.stdout
    p = subprocess.run(cmd + ["--splits", "nope"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "write_shards: error: unknown split 'nope'; the source has: train, val, test"]
    p = subprocess.run(cmd + ["--max-shard-size", "1XB"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "write_shards: error: argument --max-shard-size: not a size: '1XB' (e.g. 1GB, 500MB)"]


@pytest.mark.parametrize("path,images", [("coco/base.yaml", {"train": 113287, "val": 5000, "test": 5000}),
                                         ("flickr30k/base.yaml", {"train": 29000, "val": 1014, "test": 1000})])
def test_config_specs_follow_writer_naming(repo, path, images):
    """The shipped configs name exactly the shards the writer makes for the standard splits with its defaults."""
    data = yaml.safe_load((repo / "configs" / path).read_text())["data"]
    per = parser().parse_args(["jsonl", "--input", "x", "--out", "y"]).samples_per_shard
    for split, n in images.items():
        assert data[f"{split}_shards"] == "${data.root}/" + brace_spec([f"{split}-{i:06d}.tar" for i in range(-(-n // per))])
    assert data["samples_per_epoch"] == images["train"]
