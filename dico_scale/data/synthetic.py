"""Embedded demo dataset: coloured shapes with 5 grounded captions each, written as WebDataset tar shards.

Every image is built from a Scene (1-3 shapes in distinct cells of a 3x3 grid, so they never overlap) and the
captions are generated from the same Scene, so they are correct by construction and a captioner has to look at
the image (colour, shape, size, position, count) to get them right. Deterministic from a seed, byte for byte.
"""
import fcntl, functools, hashlib, io, json, math, os, random, shutil, sys, tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import OneLineParser, first_line

SPLITS = ("train", "val", "test")
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {  # well separated in RGB so the colour word is recoverable after JPEG
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230), "yellow": (240, 220, 30),
    "purple": (140, 40, 190), "orange": (250, 140, 20), "cyan": (0, 210, 220),
}
SIZES = {"small": 0.26, "large": 0.42}  # shape radius as a fraction of the grid cell
COUNT_WORDS = ("zero", "one", "two", "three")
MAX_WORDS = 16
DEFAULTS = dict(seed=0, n_train=2000, n_val=100, n_test=100, image_size=64, samples_per_shard=250, jpeg_quality=90)


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    size: str
    row: int  # grid cell, 0..2 top to bottom
    col: int  # 0..2 left to right
    cx: float  # centre in pixels
    cy: float
    r: float  # radius in pixels

    @property
    def loc(self):  # short prepositional phrase for the cell
        v, h = ("top", "", "bottom")[self.row], ("left", "", "right")[self.col]
        if v and h: return f"at the {v} {h}"
        if v: return f"at the {v}"
        return f"on the {h}" if h else "in the center"

    @property
    def loc_image(self):  # longer phrase naming the image, used for single-shape captions
        v, h = ("top", "", "bottom")[self.row], ("left", "", "right")[self.col]
        if v and h: return f"in the {v} {h} corner of the image"
        if v: return f"at the {v} of the image"
        return f"on the {h} side of the image" if h else "in the center of the image"


@dataclass(frozen=True)
class Scene:
    image_size: int
    background: tuple
    shapes: tuple  # of ShapeSpec, sorted left-to-right then top-to-bottom (the order captions mention them)

    @property
    def dark(self):
        return sum(self.background) < 3 * 128


def make_scene(rng: random.Random, image_size: int = 64) -> Scene:
    k = rng.randint(1, 3)
    cells = sorted(rng.sample(range(9), k), key=lambda c: (c % 3, c // 3))
    colours = rng.sample(sorted(COLOURS), k)  # distinct colours, so "the red circle" is unambiguous
    cell = image_size / 3
    shapes = []
    for c, colour in zip(cells, colours):
        row, col, size = c // 3, c % 3, rng.choice(sorted(SIZES))
        r = SIZES[size] * cell
        slack = max(0.0, 0.8 * (cell / 2 - r - 1))  # jitter but stay inside the cell: no overlaps
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        shapes.append(ShapeSpec(rng.choice(SHAPES), colour, size, row, col, cx, cy, r))
    base = rng.randint(15, 45) if rng.random() < 0.5 else rng.randint(205, 240)
    background = tuple(min(255, max(0, base + rng.randint(-8, 8))) for _ in range(3))
    return Scene(image_size, background, tuple(shapes))


def draw_scene(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.image_size, scene.image_size), scene.background)
    d = ImageDraw.Draw(img)
    for s in scene.shapes:
        x, y, r, fill = s.cx, s.cy, s.r, COLOURS[s.colour]
        if s.shape == "circle":
            d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif s.shape == "square":
            h = 0.85 * r  # a bit smaller than the circle so areas are comparable
            d.rectangle([x - h, y - h, x + h, y + h], fill=fill)
        elif s.shape == "triangle":  # vertices on the circle, pointing up; centroid is the centre
            d.polygon([(x, y - r), (x + 0.866 * r, y + 0.5 * r), (x - 0.866 * r, y + 0.5 * r)], fill=fill)
        elif s.shape == "star":
            pts = []
            for i in range(10):
                rr = r if i % 2 == 0 else 0.45 * r
                a = -90 + 36 * i
                pts.append((x + rr * math.cos(math.radians(a)), y + rr * math.sin(math.radians(a))))
            d.polygon(pts, fill=fill)
        else:  # cross (plus sign)
            t = 0.35 * r
            d.rectangle([x - r, y - t, x + r, y + t], fill=fill)
            d.rectangle([x - t, y - r, x + t, y + r], fill=fill)
    return img


def _np(s: ShapeSpec, sized: bool) -> str:  # noun phrase with article: "a large red circle", "an orange star"
    words = ([s.size] if sized else []) + [s.colour, s.shape]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def _join(items):  # "a", "a and b", "a, b and c"
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def scene_captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """n distinct correct captions. The first is the most detailed one that fits in MAX_WORDS; the others are
    sampled from the remaining templates. Each template is tried with sizes first, then without if too long."""
    ss, k = scene.shapes, len(scene.shapes)
    count = f"{COUNT_WORDS[k]} shape" + ("s" if k > 1 else "")
    cands = []

    def add(*alts):
        for c in alts:
            if len(c.split()) <= MAX_WORDS:
                cands.append(c)
                return

    def each(fmt):  # the same template with and without sizes
        return [fmt(sized) for sized in (True, False)]

    add(*each(lambda z: _join([f"{_np(s, z)} {s.loc}" for s in ss])))
    if k == 1:
        s = ss[0]
        add(*each(lambda z: f"{_np(s, z)} {s.loc_image}"))
        add(f"a single {s.size} {s.colour} {s.shape}")
    if k > 1 and len({s.col for s in ss}) == k:  # shapes are already sorted left to right
        add(*each(lambda z: "from left to right: " + _join([_np(s, z) for s in ss])))
    elif k > 1 and len({s.row for s in ss}) == k:
        add(*each(lambda z: "from top to bottom: " + _join([_np(s, z) for s in sorted(ss, key=lambda s: s.row)])))
    add(*each(lambda z: f"{count}: " + _join([_np(s, z) for s in ss])))
    prefix = rng.choice(["a picture of", "an image of", "a drawing of", "an image with"])
    add(*each(lambda z: f"{prefix} " + _join([_np(s, z) for s in ss])))
    sized = [rng.random() < 0.5 for _ in ss]  # mixed detail, like "a small blue square at the top and a green ..."
    add("there is " + _join([f"{_np(s, z)} {s.loc}" for s, z in zip(ss, sized)]),
        "there is " + _join([f"{_np(s, False)} {s.loc}" for s in ss]))
    bg = "dark" if scene.dark else "light"
    add(*each(lambda z: _join([_np(s, z) for s in ss]) + f" on a {bg} background"))
    add(_join([f"the {s.colour} {s.shape} is {s.loc}" for s in ss]))
    s = rng.choice(ss)  # one shape located, the rest counted
    if k > 1:
        add(f"{_np(s, True)} {s.loc} and {COUNT_WORDS[k - 1]} other shape" + ("s" if k > 2 else ""))
    add(f"the {s.colour} {s.shape} is {s.loc}")
    cands = list(dict.fromkeys(cands))  # dedupe, keep order
    out = cands[:1] + rng.sample(cands[1:], min(n - 1, len(cands) - 1))
    return [out[i % len(out)] for i in range(n)]


def render_sample(rng: random.Random, image_size: int) -> tuple[Image.Image, list[str]]:
    """One image and its 5 captions."""
    scene = make_scene(rng, image_size)
    return draw_scene(scene), scene_captions(scene, rng)


def _validate(a: dict) -> dict:
    unknown = set(a) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown argument(s): {sorted(unknown)}")
    a = {**DEFAULTS, **a}
    limits = {"seed": (-2**63, 2**63), "n_train": (0, 10**9), "n_val": (0, 10**9), "n_test": (0, 10**9),
              "image_size": (32, 1024), "samples_per_shard": (1, 10**9), "jpeg_quality": (1, 100)}
    for name, (lo, hi) in limits.items():
        if not isinstance(a[name], int) or not lo <= a[name] <= hi:
            raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {a[name]!r}")
    return a


def _add(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)  # fixed metadata so the tar bytes depend only on the content
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def _patterns(out_dir: Path, manifest: dict) -> dict[str, str]:
    # the manifest stores patterns relative to the folder, so the dataset can be moved / renamed into place
    return {k: (str(out_dir / v["pattern"]) if v["pattern"] else "") for k, v in manifest["splits"].items()}


def _folder(out_dir: str | Path) -> Path:
    """out_dir made absolute. ValueError for an empty path (it would mean the working directory, whatever that is)
    and a symlink loop (pathlib's RuntimeError before Python 3.13)."""
    if not str(out_dir).strip():
        raise ValueError("no folder given for the synthetic set (an empty path)")
    try:
        return Path(out_dir).resolve()
    except RuntimeError:
        raise ValueError(f"'{out_dir}' runs into a symlink loop") from None


def write_synthetic_dataset(out_dir: str | Path, *, seed: int = 0, n_train: int = 2000, n_val: int = 100,
                            n_test: int = 100, image_size: int = 64, samples_per_shard: int = 250,
                            jpeg_quality: int = 90) -> dict[str, str]:
    """Writes out_dir/{split}-{i:05d}.tar and out_dir/manifest.json; returns {split: brace pattern}, e.g.
    {"train": "/abs/out/train-{00000..00007}.tar", ...}. A split with 0 samples has no shards and pattern ""."""
    args = _validate(dict(seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size,
                          samples_per_shard=samples_per_shard, jpeg_quality=jpeg_quality))
    out_dir = _folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"args": args, "splits": {}}
    for split in SPLITS:
        n = args[f"n_{split}"]
        rng = random.Random(f"{seed}-{split}")  # own stream per split: changing n_train keeps val/test fixed
        shards = [f"{split}-{i:05d}.tar" for i in range((n + samples_per_shard - 1) // samples_per_shard)]
        for i, shard in enumerate(shards):
            with tarfile.open(out_dir / shard, "w", format=tarfile.USTAR_FORMAT) as tar:
                for idx in range(i * samples_per_shard, min(n, (i + 1) * samples_per_shard)):
                    img, caps = render_sample(rng, image_size)
                    buf = io.BytesIO()
                    img.save(buf, "JPEG", quality=jpeg_quality, subsampling=0)  # 4:4:4: tiny shapes keep colour
                    key = f"{split}_{idx:06d}"
                    _add(tar, key + ".jpg", buf.getvalue())
                    _add(tar, key + ".json", json.dumps(caps).encode())
        pattern = shards[0] if len(shards) == 1 else f"{split}-{{00000..{len(shards) - 1:05d}}}.tar" if shards else ""
        manifest["splits"][split] = {"pattern": pattern, "num_samples": n, "shards": shards}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))  # written last: marks completion
    return _patterns(out_dir, manifest)


def _read_manifest(path: Path) -> dict | None:
    """The folder's manifest.json as a dict, or None (missing, unreadable, not JSON, not an object)."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _own_dataset(out_dir: Path, manifest: dict | None) -> bool:
    """Whether out_dir holds a set this generator wrote and nothing else: its manifest (with the arguments it was
    made with) and the shards that lists. write_shards' manifests record no arguments."""
    if manifest is None or not isinstance(manifest.get("args"), dict) or not isinstance(manifest.get("splits"), dict):
        return False
    try:
        listed = {"manifest.json", *(shard for split in manifest["splits"].values() for shard in split["shards"])}
    except (TypeError, KeyError, AttributeError):
        return False
    return all(p.name in listed for p in out_dir.iterdir())


def expanding_marks(path: str) -> list[str]:
    """The characters of a folder that shard specs naming its shards would expand: braces and globs, and '::',
    webdataset's separator of several specs."""
    return sorted(set(path) & set("{}*?[]")) + ["::"] * ("::" in path)


def ensure_synthetic_dataset(out_dir: str | Path, say=functools.partial(print, flush=True),
                             **kwargs) -> dict[str, str]:
    """Generates the dataset only when out_dir/manifest.json is missing or records different arguments; otherwise
    returns the patterns from the manifest. Generation goes to a temporary sibling folder that is renamed into
    place, and a file lock beside out_dir makes concurrent callers (e.g. several ranks) wait for one generator. An
    out_dir that holds anything but a set this generator wrote (a user's shards, their files) is never replaced:
    ValueError."""
    args = _validate(kwargs)
    out_dir = _folder(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"'{out_dir}' is a file, not a folder for the synthetic set")
    if marks := expanding_marks(str(out_dir)):
        raise ValueError(f"'{out_dir}' holds {' '.join(marks)}, which the shard patterns built from it would expand: "
                         "give the synthetic set a plain folder name")
    mpath = out_dir / "manifest.json"
    manifest = _read_manifest(mpath)
    if manifest is not None and manifest.get("args") == args:  # complete: no lock (the folder may be read-only)
        return _patterns(out_dir, manifest)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # a fixed-length lock name: '.<name>.lock' overflowed the 255 bytes a file name may have
    lock_name = f".synthetic-{hashlib.sha1(out_dir.name.encode()).hexdigest()[:16]}.lock"
    with open(out_dir.parent / lock_name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        manifest = _read_manifest(mpath)  # another process may have written it meanwhile
        if manifest is not None and manifest.get("args") == args:
            return _patterns(out_dir, manifest)
        if out_dir.exists() and any(out_dir.iterdir()) and not _own_dataset(out_dir, manifest):
            # a user's folder (their shards, their files): only a set this generator wrote is ever replaced
            raise ValueError(f"'{out_dir}' holds files that are not a synthetic set this generator wrote; refusing "
                             "to replace them (generate it into a folder of its own)")
        changed = {k: (v, args[k]) for k, v in (manifest or {}).get("args", {}).items() if args.get(k) != v}
        # say: stdout by default, progress as the steps' lines (stderr holds a run's warnings and its error)
        say(f"dico_scale: {'replacing' if manifest else 'generating'} the synthetic set in {out_dir}"
            + (" (" + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()) + ")" if changed else ""))
        tmp = out_dir.parent / f".synthetic-{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write_synthetic_dataset(tmp, **args)
        if out_dir.exists():  # an older dataset made with other arguments
            old = out_dir.parent / f".synthetic-{os.getpid()}.old"
            out_dir.rename(old)
            shutil.rmtree(old)
        tmp.rename(out_dir)
        return _patterns(out_dir, json.loads(mpath.read_text()))


def main(argv=None):
    p = OneLineParser(prog="dico_scale.data.synthetic",
                      description="Generate the synthetic shapes captioning dataset (WebDataset shards).")
    p.add_argument("out_dir")
    for name, default in DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    p.add_argument("--force", action="store_true", help="regenerate even if a matching manifest exists")
    a = vars(p.parse_args(argv))
    out_dir, force = a.pop("out_dir"), a.pop("force")
    try:
        say = functools.partial(print, file=sys.stderr)  # stdout holds the patterns
        patterns = write_synthetic_dataset(out_dir, **a) if force else ensure_synthetic_dataset(out_dir, say, **a)
    except (ValueError, OSError) as e:  # a bad size, an out_dir that cannot be written
        print(f"{p.prog}: error: {e if isinstance(e, ValueError) else first_line(e)}", file=sys.stderr)
        return 2
    for split, pattern in patterns.items():
        print(f"{split} {pattern}")
    return 0


def caption_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """The captions of n random scenes: the text the tiny models' tokenizers are trained on (models/tiny.py)."""
    rng = random.Random(seed)
    return [c for _ in range(n) for c in scene_captions(make_scene(rng), rng)]


if __name__ == "__main__":
    from dico_scale.exit_codes import leave

    leave(main())
