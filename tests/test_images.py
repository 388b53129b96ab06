"""Image modes: to_rgb against independent numpy references for every mode PIL opens, the size guard, the shard
writer and the loader on such images, and the official resize -> crop -> RGB order on the evaluation path."""
import colorsys
import io
import json
import tarfile
import warnings

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageCms
from torchvision import transforms

from dico_scale.caption import load_pixels
from dico_scale.data.images import ImageError, ImageTooLarge, for_eval, open_image, to_rgb
from dico_scale.data.pipeline import Collate, eval_loader, train_loader
from dico_scale.data.tokenizer import CaptionTokenizer
from dico_scale.data.write_shards import main as write_main

W, H = 40, 24
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (H, W), dtype=np.uint8)
ALPHA[0, :3] = (0, 1, 255)  # the extremes, always present


def saved(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(np.int64)


def over(rgb, alpha, bg=(255, 255, 255)):
    """Alpha compositing by hand: a * rgb + (1 - a) * bg."""
    a = alpha.astype(np.float64)[..., None] / 255
    return np.rint(a * rgb + (1 - a) * np.asarray(bg, np.float64))


def close(got: Image.Image, want, tol: float):
    assert got.mode == "RGB" and got.size == (want.shape[1], want.shape[0])
    assert np.abs(arr(got) - want).max() <= tol


# ---- to_rgb, mode by mode -------------------------------------------------------------------------------------------

def test_bilevel_grey_rgb():
    bits = np.random.default_rng(2).integers(0, 2, (H, W), dtype=bool)
    close(to_rgb(open_image(saved(Image.fromarray(bits), "PNG"))), np.repeat(bits[..., None] * 255, 3, -1), 0)
    grey = RGB[..., 0]
    close(to_rgb(open_image(saved(Image.fromarray(grey), "PNG"))), np.repeat(grey[..., None], 3, -1), 0)
    close(to_rgb(open_image(saved(Image.fromarray(RGB), "PNG"))), RGB, 0)
    close(to_rgb(Image.fromarray(np.dstack([RGB, ALPHA])).convert("RGBX")), RGB, 0)  # padding byte dropped


@pytest.mark.parametrize("bg", [(255, 255, 255), (0, 128, 255)])
def test_alpha_composited_over_background(bg):
    rgba = open_image(saved(Image.fromarray(np.dstack([RGB, ALPHA])), "PNG"))
    assert rgba.mode == "RGBA"
    close(to_rgb(rgba, bg), over(RGB, ALPHA, bg), 1)
    grey = RGB[..., 1]
    la = open_image(saved(Image.fromarray(np.dstack([grey, ALPHA])), "PNG"))
    assert la.mode == "LA"
    close(to_rgb(la, bg), over(np.repeat(grey[..., None], 3, -1), ALPHA, bg), 1)
    assert np.abs(arr(rgba.convert("RGB")) - over(RGB, ALPHA, bg)).max() > 100  # what dropping alpha would give


def test_premultiplied_alpha():
    a = ALPHA.astype(np.float64)[..., None] / 255
    pre = np.rint(RGB * a).astype(np.uint8)  # RGBa stores a * rgb
    want = np.rint(pre + (1 - a) * 255)  # over white: premultiplied colour + (1 - a) * bg
    close(to_rgb(Image.frombytes("RGBa", (W, H), np.dstack([pre, ALPHA]).tobytes())), want, 2)
    la = Image.frombytes("La", (W, H), np.dstack([pre[..., 0], ALPHA]).tobytes())
    close(to_rgb(la), np.repeat(want[..., :1], 3, -1), 2)


def _palette_image():
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 16, (H, W), dtype=np.uint8)
    pal = rng.integers(0, 128, (16, 3), dtype=np.uint8)  # dark colours: a dropped alpha shows
    im = Image.frombytes("P", (W, H), idx.tobytes())
    im.putpalette(pal.tobytes())
    return im, idx, pal


def test_palette_with_and_without_transparency():
    im, idx, pal = _palette_image()
    close(to_rgb(open_image(saved(im, "PNG"))), pal[idx], 0)
    alphas = np.array([0, 128, 255, 64] * 4, dtype=np.uint8)  # tRNS: one alpha per palette entry
    t = open_image(saved(im, "PNG", transparency=alphas.tobytes()))
    assert t.mode == "P" and isinstance(t.info["transparency"], bytes)
    close(to_rgb(t), over(pal[idx], alphas[idx]), 1)
    key = open_image(saved(im, "PNG", transparency=3))  # one fully transparent index
    close(to_rgb(key, (0, 0, 255)), np.where((idx == 3)[..., None], [0, 0, 255], pal[idx]), 0)
    rgba_palette = im.copy()
    rgba_palette.putpalette(np.hstack([pal, alphas[:, None]]).tobytes(), "RGBA")  # alpha inside the palette
    close(to_rgb(rgba_palette), over(pal[idx], alphas[idx]), 1)
    pa = im.convert("PA")
    pa.putalpha(Image.fromarray(ALPHA))
    close(to_rgb(pa), over(pal[idx], ALPHA), 1)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(fmt):
    cmyk = np.random.default_rng(3).integers(0, 256, (H, W, 4), dtype=np.uint8)
    kw = {"quality": 95} if fmt == "JPEG" else {}
    im = open_image(saved(Image.frombytes("CMYK", (W, H), cmyk.tobytes()), fmt, **kw))
    assert im.mode == "CMYK"
    got = to_rgb(im)
    c = arr(im)  # the decoded ink (a JPEG round trip changes it; PIL undoes Adobe's inversion)
    close(got, np.rint((255 - c[..., :3]) * (255 - c[..., 3:]) / 255), 0)
    assert np.array_equal(arr(got), arr(im.convert("RGB")))  # PIL's own CMYK -> RGB


def test_ycbcr_hsv_lab():
    ycc = Image.frombytes("YCbCr", (W, H), RGB.tobytes())
    y, cb, cr = (RGB[..., i].astype(np.float64) for i in range(3))
    want = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                     y + 1.772 * (cb - 128)], -1).clip(0, 255)  # JPEG's YCbCr -> RGB
    close(to_rgb(open_image(saved(ycc, "TIFF"))), np.rint(want), 1)
    hsv = Image.frombytes("HSV", (W, H), RGB.tobytes())
    want = np.array([[colorsys.hsv_to_rgb(*(p / 255)) for p in row] for row in RGB]) * 255
    close(to_rgb(hsv), np.rint(want), 1)
    lab = open_image(saved(Image.frombytes("LAB", (W, H), RGB.tobytes()), "TIFF"))
    assert lab.mode == "LAB"
    cms = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    close(to_rgb(lab), arr(ImageCms.applyTransform(lab, cms)), 1)  # littlecms, not a channel copy
    assert np.abs(arr(to_rgb(lab)) - RGB).max() > 50


GRAD16 = (np.arange(W * H).reshape(H, W) * (65535 // (W * H - 1))).astype(np.uint16)


@pytest.mark.parametrize("fmt,mode", [("PNG", "I;16"), ("TIFF", "I;16"), ("TIFF", "I;16B")])
def test_16_bit_grey(fmt, mode):
    im = Image.fromarray(GRAD16) if mode == "I;16" else Image.frombytes(mode, (W, H), GRAD16.astype(">u2").tobytes())
    im = open_image(saved(im, fmt))
    assert im.mode == mode
    want = np.repeat((GRAD16 >> 8)[..., None], 3, -1)
    close(to_rgb(im), want, 0)
    assert (arr(im.convert("RGB")) == 255).mean() > 0.95 and want.mean() < 140  # a plain convert clips: white


@pytest.mark.parametrize("dtype,values,want", [
    (np.int32, GRAD16 // 257, GRAD16 // 257),  # max <= 255: 8-bit data
    (np.int32, GRAD16, GRAD16 >> 8),  # max <= 65535: 16-bit data
    (np.int32, GRAD16.astype(np.int64) * 50 - 10**5, None),  # larger: scaled by the max, negatives 0
    (np.float32, GRAD16 / 65535, None),  # float in [0, 1]
    (np.float32, GRAD16 / 257, None),  # float 8-bit range
])
def test_32_bit_grey(dtype, values, want):
    v = values.astype(dtype)
    im = open_image(saved(Image.fromarray(v), "TIFF"))
    assert im.mode == ("I" if dtype == np.int32 else "F")
    if want is None:
        f = v.astype(np.float64).clip(min=0)
        want = np.rint(f * 255) if f.max() <= 1 else np.rint(f) if f.max() <= 255 else np.rint(f * 255 / f.max())
    close(to_rgb(im), np.repeat(want[..., None], 3, -1), 0)


@pytest.mark.parametrize("orientation,k", [(6, -1), (8, 1), (3, 2)])  # 6: turn 90 deg clockwise to view
def test_exif_orientation(orientation, k):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = saved(Image.fromarray(RGB), "JPEG", quality=95, exif=exif.tobytes())
    stored = arr(Image.open(io.BytesIO(data)).convert("RGB"))
    close(to_rgb(open_image(data)), np.rot90(stored, k), 0)
    assert for_eval(open_image(data)).size == to_rgb(open_image(data)).size


@pytest.mark.parametrize("size", [(40, 30), (50, 50)])  # past the limit (PIL warns), past twice it (PIL raises)
@pytest.mark.parametrize("filter_", ["ignore", "default"])
def test_too_large(monkeypatch, size, filter_):
    data = saved(Image.new("RGB", size), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter(filter_)  # the outcome must not depend on the process's warning filters
        with pytest.raises(ImageTooLarge, match=rf"image too large \({size[0] * size[1]} pixels, limit 1000\)"):
            open_image(data)
    for f in (to_rgb, for_eval):  # also for an image opened elsewhere
        with pytest.raises(ImageTooLarge):
            f(Image.new("RGB", size))


def test_failure_names_the_mode(monkeypatch):
    im = Image.new("CMYK", (4, 4))
    monkeypatch.setattr(Image.Image, "convert", lambda *a, **k: (_ for _ in ()).throw(ValueError("no way")))
    with pytest.raises(ImageError, match="image mode CMYK to RGB.*no way"):
        to_rgb(im)


def test_for_eval_keeps_the_mode():
    cases = {"RGBA": "RGBA", "P": "P", "CMYK": "CMYK", "L": "L", "1": "1", "YCbCr": "YCbCr", "LAB": "LAB",
             "I;16": "L", "I": "L", "F": "L", "La": "LA", "PA": "RGBA"}
    for mode, want in cases.items():
        out = for_eval(Image.new(mode, (6, 4)))
        assert out.mode == want
        out.convert("RGB")  # every mode it gives converts
    g = for_eval(open_image(saved(Image.fromarray(GRAD16), "PNG")))
    assert np.array_equal(arr(g), GRAD16 >> 8)


# ---- the shard writer and the loader ------------------------------------------------------------------------------

def _smooth(w, h):
    """A gradient: JPEG keeps it within a few levels, so shard pixels can be compared with the source's."""
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    return np.rint(np.dstack([x, y, 1 - x]) * 255).astype(np.uint8)


def _sources():
    """{name: (file bytes, the RGB image it depicts as a numpy array)}."""
    rgb = _smooth(64, 48)
    alpha = np.rint(np.linspace(0, 255, 64))[None, :].repeat(48, 0).astype(np.uint8)
    dark = (rgb // 4).astype(np.uint8)
    grey16 = np.rint(np.linspace(0, 65535, 48))[:, None].repeat(64, 1).astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6
    cmyk = Image.fromarray(rgb).convert("CMYK")
    return {
        "rgba.png": (saved(Image.fromarray(np.dstack([dark, alpha])), "PNG"), over(dark, alpha)),
        "grey16.png": (saved(Image.fromarray(grey16), "PNG"), np.repeat((grey16 >> 8)[..., None], 3, -1)),
        "cmyk.jpg": (saved(cmyk, "JPEG", quality=95), arr(cmyk.convert("RGB"))),
        "rot6.jpg": (saved(Image.fromarray(rgb), "JPEG", quality=95, exif=exif.tobytes()), np.rot90(rgb, -1)),
        "plain.jpg": (saved(Image.fromarray(rgb), "JPEG", quality=95), rgb),
    }


def _pixels_by_key(loader):
    got = {}
    for b in loader:
        for k, px in zip(b["keys"], b["pixels"]):
            got[k] = px.permute(1, 2, 0).numpy().astype(np.int64)
    return got


def _raw_collate():
    return Collate(transforms.PILToTensor(), None, CaptionTokenizer(), 24, seed=0)


def test_writer_and_loader_round_trip(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    src.mkdir()
    cases = _sources()
    for name, (data, _) in cases.items():
        (src / name).write_bytes(data)
    wide = _smooth(700, 60)  # past the default --max-side 640
    Image.fromarray(wide).save(src / "wide.jpg", quality=95)
    Image.new("RGB", (400, 300)).save(src / "bomb.png")  # 120000 pixels: PIL would only warn
    Image.new("RGB", (500, 500)).save(src / "bomb2.png")  # past twice the limit: PIL raises
    names = [*cases, "wide.jpg", "bomb.png", "bomb2.png"]
    rows = [{"image": n, "captions": [f"image {n}"], "id": n.split(".")[0]} for n in names]
    (src / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # --workers 1 decodes in this process
    assert write_main(["jsonl", "--input", str(src / "pairs.jsonl"), "--out", str(tmp_path / "out"), "--workers", "1",
                       "--no-progress"]) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["options"]["max_side"] == 640 and "skipped: 2 image too large (listed in" in capsys.readouterr().out
    assert {x["key"]: x["reason"] for x in m["skipped"]} == {
        "bomb": "image too large (120000 pixels, limit 100000)",
        "bomb2": "image too large (250000 pixels, limit 100000)"}
    assert m["splits"]["train"]["skipped"] == 2 and m["splits"]["train"]["images"] == len(cases) + 1
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        stored = {x.name: tar.extractfile(x).read() for x in tar.getmembers() if x.name.endswith(".jpg")}
    assert stored["plain.jpg"] == cases["plain.jpg"][0]  # plain, upright, small: copied byte for byte
    for name in ("cmyk.jpg", "rot6.jpg", "rgba.jpg", "grey16.jpg"):
        im = Image.open(io.BytesIO(stored[name]))
        assert (im.format, im.mode, im.getexif().get(0x0112)) == ("JPEG", "RGB", None)  # re-encoded, upright
    got = _pixels_by_key(eval_loader(str(tmp_path / "out" / m["splits"]["train"]["spec"]), _raw_collate(), 1))
    assert sorted(got) == sorted(r["id"] for r in rows[:-2])
    for name, (_, want) in cases.items():
        px = got[name.split(".")[0]]
        assert px.shape == want.shape and np.abs(px - want).mean() < 3, name
    assert got["wide"].shape == (55, 640, 3) and np.abs(got["wide"] - np.asarray(
        Image.fromarray(wide).resize((640, 55), Image.Resampling.BICUBIC)).astype(int)).mean() < 3


def _tar(path, members: dict):
    with tarfile.open(path, "w") as tar:
        for key, data in members.items():
            for name, payload in ((f"{key}.jpg", data), (f"{key}.json", json.dumps([f"caption {key}"]).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def test_loader_decodes_every_mode_and_skips_too_large(tmp_path, monkeypatch, clean_env):
    """Shards written by other tools may hold any image under .jpg: the training loader gives to_rgb's pixels."""
    cases = {name.split(".")[0]: c for name, c in _sources().items()}
    spec = _tar(tmp_path / "modes.tar", {**{k: data for k, (data, _) in cases.items()},
                                         "bomb": saved(Image.new("RGB", (400, 300)), "PNG")})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    n = 3 * (len(cases) + 1)
    loader, _ = train_loader(spec, _raw_collate(), 1, n, 1, 0, 1, 0)
    batches = list(loader)
    got = _pixels_by_key(batches)
    assert sorted(got) == sorted(cases)
    for k, (data, _) in cases.items():
        assert np.array_equal(got[k], arr(to_rgb(open_image(data)))), k
    assert np.abs(got["grey16"] - cases["grey16"][1]).max() == 0 and np.abs(got["rgba"] - cases["rgba"][1]).max() <= 1
    stats = sum((torch.tensor([b["data_stats"].get(k, 0) for k in ("image_too_large", "corrupt_image")])
                 for b in batches), torch.zeros(2, dtype=torch.long))
    assert stats[0] >= 1 and stats[1] == 0
    evals = list(eval_loader(spec, _raw_collate(), 1))
    assert "bomb" not in _pixels_by_key(evals) and sum(b["data_stats"].get("image_too_large", 0) for b in evals) == 1


# ---- evaluation: the official order ----------------------------------------------------------------------------------

N_PX = 32


def official(n_px=N_PX):
    """jmhessel/clipscore's transform: Resize(BICUBIC), CenterCrop, convert("RGB") last, ToTensor, Normalize."""
    return transforms.Compose([
        transforms.Resize(n_px, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(n_px),
        lambda image: image.convert("RGB"), transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])


@pytest.fixture
def eval_files(tmp_path):
    """An RGBA and a palette image, 80x60: the resize to 32 px does real filtering."""
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (60, 80), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    pal = Image.frombytes("P", (80, 60), rng.integers(0, 256, 80 * 60, dtype=np.uint8).tobytes())
    pal.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    pal.save(tmp_path / "pal.png")
    return {"rgba": tmp_path / "rgba.png", "pal": tmp_path / "pal.png"}


def _official_and_convert_first(path):
    t = official()
    return t(Image.open(path)), t(Image.open(path).convert("RGB"))


def test_eval_loader_follows_official_order(eval_files, tmp_path, clean_env):
    spec = _tar(tmp_path / "eval.tar", {k: p.read_bytes() for k, p in eval_files.items()})
    pre = open_clip.image_transform(N_PX, is_train=False)  # open_clip's eval preprocess: same order
    tok = CaptionTokenizer()
    batch = next(iter(eval_loader(spec, Collate(pre, None, tok, 24, seed=0), 2)))
    train = next(iter(train_loader(spec, Collate(pre, None, tok, 24, seed=0), 2, 2, 1, 0, 1, 0)[0]))
    for i, key in enumerate(batch["keys"]):
        want, first = _official_and_convert_first(eval_files[key])
        assert torch.allclose(batch["pixels"][i], want, atol=1e-6), key
        assert (batch["pixels"][i] - first).abs().max() > 1e-2, key  # converting first differs
        j = train["keys"].index(key)  # training keeps its own: to_rgb first
        assert torch.allclose(train["pixels"][j], pre(to_rgb(Image.open(eval_files[key]))), atol=1e-6)
    plain = transforms.Compose([transforms.Resize(N_PX), transforms.CenterCrop(N_PX), transforms.ToTensor()])
    batch = next(iter(eval_loader(spec, Collate(plain, None, tok, 24, seed=0), 2)))  # no RGB step of its own
    assert batch["pixels"].shape == (2, 3, N_PX, N_PX)


def test_caption_files_follow_official_order(eval_files):
    pre = open_clip.image_transform(N_PX, is_train=False)
    for path in eval_files.values():
        want, first = _official_and_convert_first(path)
        got = load_pixels(pre, str(path))
        assert torch.allclose(got, want, atol=1e-6) and (got - first).abs().max() > 1e-2
