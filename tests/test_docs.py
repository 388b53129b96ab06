"""README.md and docs/*.md checked against the code, so that they cannot drift: every relative link and #anchor
resolves, every config key written as `section.key[=value]` is in the schema, every `python -m dico_scale...` module
and repository path named in code exists, and every `make X` is a Makefile target. Each checker is a function of
text, tested on synthetic text below so that its failing case stays tested."""
import importlib.util
import re
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from dico_scale.config import RENAMED, Config

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BAD_ON_PURPOSE = {"optim.lrr"}  # the docs show the error an unknown key gives
FENCE = re.compile(r"^ *```.*?^ *```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")


def split_code(text: str) -> tuple[str, str]:
    """(prose without code, the code: fenced blocks and inline spans, one per line)."""
    blocks = FENCE.findall(text)
    prose = FENCE.sub("", text)
    return INLINE.sub("", prose), "\n".join(blocks + INLINE.findall(prose))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (not - or _), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), re.M):
        s = slug(heading)
        out.add(s if s not in seen else f"{s}-{seen[s]}")  # GitHub numbers repeated headings: x, x-1, x-2
        seen[s] = seen.get(s, 0) + 1
    return out


def broken_links(page: Path, text: str) -> list[str]:
    """Relative links whose file, or whose #anchor in that .md file, does not exist."""
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", split_code(text)[0]):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            out.append(f"link {target}: no file {path}")
        elif anchor and anchor not in anchors(file.read_text()):
            out.append(f"link {target}: no heading #{anchor} in {file.name}")
    return out


def schema_keys(node=Config(), prefix: str = "") -> set[str]:
    """Every dotted key of the config schema, sections included (data, data.synthetic, data.synthetic.seed...)."""
    out = set()
    for f in fields(node):
        key, val = prefix + f.name, getattr(node, f.name)
        out.add(key)
        if is_dataclass(val):
            out |= schema_keys(val, key + ".")
    return out


def free_dicts(node=Config(), prefix: str = "") -> set[str]:
    """The schema's free-form dict keys (captioner.images_kwargs): any key below them is a user's."""
    out = set()
    for f in fields(node):
        key, val = prefix + f.name, getattr(node, f.name)
        out |= free_dicts(val, key + ".") if is_dataclass(val) else {key} if isinstance(val, dict) else set()
    return out


SCHEMA = schema_keys() | set(RENAMED)  # an old name still works (with a warning): docs may name it
FREE = free_dicts()
# `section.key`, not part of a path (dico_scale/train.py), a module (dico_scale.train) or a file name (train.py)
DOTTED = re.compile(r"(?<![\w./-])([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)(?![\w/-])")
FILE_SUFFIX = {"py", "md", "yaml", "json", "jsonl", "pt", "pth", "sh", "db", "tar", "png", "bin", "safetensors"}


def unknown_keys(text: str, schema: set[str] = SCHEMA) -> list[str]:
    sections = {k.split(".")[0] for k in schema if "." in k}
    return [f"config key {key}: not in the schema (dico_scale/config.py)" for key in DOTTED.findall(split_code(text)[1])
            if key.split(".")[0] in sections and key.rsplit(".", 1)[1] not in FILE_SUFFIX
            and key not in schema | BAD_ON_PURPOSE and not any(key.startswith(f + ".") for f in FREE)]


def missing_modules(text: str) -> list[str]:
    return [f"python -m {m}: no such module" for m in re.findall(r"python3? -m (dico_scale[\w.]*)", text)
            if importlib.util.find_spec(m) is None]


def missing_paths(text: str, root: Path = REPO) -> list[str]:
    """Repository paths named in code (configs/coco/xe.yaml, dico_scale/train.py), but for outputs git ignores
    (benchmarks/wheels/); a pattern (configs/clip/*.json) is checked up to its first wildcard."""
    outputs = {line.strip("/") for line in (root / ".gitignore").read_text().split() if "*" not in line}
    tops = "dico_scale|kernels|configs|slurm|benchmarks|tests|docs"
    paths = re.findall(rf"(?<![\w./-])((?:{tops})/[\w./-]*\w)", split_code(text)[1])
    return [f"path {p}: does not exist" for p in paths if not (root / p).exists() and p not in outputs]


def make_targets(makefile: Path = REPO / "Makefile") -> set[str]:
    return set(re.findall(r"^([\w-]+):", makefile.read_text(), re.M))


def missing_targets(text: str, targets: set[str]) -> list[str]:
    return [f"make {t}: no such target" for t in re.findall(r"\bmake ([a-z][\w-]*)", split_code(text)[1])
            if t not in targets]


def test_broken_links_and_anchors_are_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n## `train.resume`: and more\n## Again\n## Again\n")
    page = tmp_path / "page.md"
    good = "[a](other.md) [b](other.md#other-page) [c](#here) [d](other.md#trainresume-and-more) [e](other.md#again-1)"
    page.write_text(f"# Here\n{good} [web](https://x.org/#nope) `[f](nothing.md)`\n")
    assert broken_links(page, page.read_text()) == []
    bad = "[a](missing.md) [b](other.md#nope) [c](#nowhere)"
    assert broken_links(page, bad) == ["link missing.md: no file missing.md", "link other.md#nope: no heading "
                                       "#nope in other.md", "link #nowhere: no heading #nowhere in page.md"]


def test_unknown_config_keys_are_found():
    text = ("Set `train.resume=auto` and `data.synthetic.seed`; `dico_scale/train.py`, `dico_scale.train`,\n"
            "`train.py`, `model.pt` and train.bogus in prose are not keys.\n"
            "```bash\npython dico_scale/train.py 'data.train_shards=/x/{0..3}.tar' optim.lr=1e-6\n```\n")
    assert unknown_keys(text) == []
    bad = "`train.resum=auto` and\n```\ndico_scale/train.py data.synthetic.nope=1 optim.lrr=1e-6\n```"
    assert unknown_keys(bad) == ["config key data.synthetic.nope: not in the schema (dico_scale/config.py)",
                                 "config key train.resum: not in the schema (dico_scale/config.py)"]


def test_missing_modules_paths_and_make_targets_are_found(tmp_path):
    assert missing_modules("python -m dico_scale.evaluate and `python -m dico_scale.data.write_shards`") == []
    assert missing_modules("run `python -m dico_scale.evaluatee`") == ["python -m dico_scale.evaluatee: no such module"]
    assert missing_paths("`configs/demo/xe.yaml` `slurm/launch.sh` `configs/clip/*.json` `data/demo`") == []
    assert missing_paths("`configs/demo/xx.yaml`") == ["path configs/demo/xx.yaml: does not exist"]
    (tmp_path / "Makefile").write_text("demo: install\n\t$(PYTHON) -m dico_scale.demo\ntest-gpu:\n")
    targets = make_targets(tmp_path / "Makefile")
    assert missing_targets("```\nmake demo\nmake test-gpu\n```\nto make sure", targets) == []
    assert missing_targets("`make demoo`", targets) == ["make demoo: no such target"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_matches_the_code(page):
    text = page.read_text()
    problems = (broken_links(page, text) + unknown_keys(text) + missing_modules(text) + missing_paths(text)
                + missing_targets(text, make_targets()))
    assert problems == [], f"{page.relative_to(REPO)}:\n" + "\n".join(problems)
