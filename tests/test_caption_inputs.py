"""What `caption` does with folders that hold no plain images: a FIFO (reading it blocked forever) is skipped with one
line like any unreadable file (exit 1); a folder with no image file is bad input (one line, exit 2), not a silent
success. A real checkpoint, real files, the real command."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
EXTENSIONS = ".jpg, .jpeg, .png, .webp, .bmp, .gif, .tif, .tiff"


@pytest.fixture
def model(tiny_xe) -> Path:
    return tiny_xe


def _caption(model: Path, *items) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dico_scale.caption", "--checkpoint", str(model), *map(str, items)]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)  # seconds when right


def test_a_fifo_is_skipped_with_one_line_not_read(model, tmp_path):
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "pipe.jpg")  # no writer: opening it for reading would wait forever
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dead.jpg")
    fifo = f"dico_scale.caption: skipping {tmp_path / 'pipe.jpg'}: not a regular file"
    proc = _caption(model, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == [str(tmp_path / "a.png")]
    assert proc.stderr.splitlines() == [
        f"dico_scale.caption: skipping {tmp_path / 'dead.jpg'}: FileNotFoundError: [Errno 2] No such file or "
        f"directory: '{tmp_path / 'dead.jpg'}'", fifo]
    proc = _caption(model, tmp_path / "pipe.jpg", tmp_path / "a.png")  # named alone: skipped alike, not refused
    assert proc.returncode == 1 and proc.stderr.splitlines() == [fifo], proc.stderr[-3000:]
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == [str(tmp_path / "a.png")]


@pytest.mark.parametrize("files", [[], ["notes.txt", "README"]])
def test_a_folder_without_images_is_one_line_and_exit_2(model, tmp_path, files):
    for name in files:
        (tmp_path / name).write_text("not an image")
    proc = _caption(model, tmp_path)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-3000:]
    assert proc.stderr == f"dico_scale.caption: error: folder {tmp_path} holds no image file ({EXTENSIONS})\n"
