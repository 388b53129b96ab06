"""The tiny-model builder's CLI (python -m dico_scale.models.tiny) refuses sizes it cannot build, or that the family
cannot train on, with one line and exit 2 before it writes anything: images smaller than a patch or that a family's
2 x 2 merge cannot split, head widths a rotary embedding cannot split, a vocabulary it would change or ignore, sizes
past a tiny model's bounds. None of these builds a model."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dico_scale.models.tiny import (FAMILIES, MAX_SIZES, TOKENIZER_SIZE, family_problem, main, train_tokenizer,
                                    write)

REPO = Path(__file__).resolve().parent.parent

REFUSED = {
    ("vit-gpt2", "--image-size", "4"): "--image-size 4: vit-gpt2 cuts images into 8-pixel patches: at least 8",
    ("llava-next", "--image-size", "7"): "--image-size 7: llava-next cuts images into 8-pixel patches: at least 8",
    ("idefics3", "--image-size", "24"): "--image-size 24: idefics3 merges its 8-pixel patches 2 x 2: a multiple of 16",
    ("gemma3", "--image-size", "40"): "a multiple of 16",
    ("qwen2-vl", "--width", "24"): "--width 24 / --heads 2: qwen2-vl's rotary embeddings split its head width 12: a "
                                   "multiple of 8",
    ("qwen3-vl", "--width", "12"): "head width 6: a multiple of 4",
    ("llava", "--width", "6"): "head width 3: a multiple of 2",
    ("gemma3", "--width", "40", "--heads", "5"): "--heads 5: gemma3's heads share 2 key/value heads",
    ("vit-gpt2", "--vocab-size", "3"): f"--vocab-size 3: below the tokenizer's {TOKENIZER_SIZE} tokens, the smallest "
                                       "allowed",
    ("dico-ref", "--vocab-size", "49409"): "dico-ref's vocabulary is the CLIP BPE's 49409 tokens",
    ("qwen2-vl", "--vocab-size", "1000"): "qwen2-vl's vocabulary is its tokenizer's",
    ("vit-gpt2", "--width", "100000"): "--width 100000: a tiny model's sizes are at most --width 1024",
    ("blip", "--image-size", "100000"): "--image-size 100000: a tiny model's sizes are at most",
    ("vit-gpt2", "--layers", "9", "--heads", "64", "--width", "128"): "--layers 9, --heads 64: a tiny model's",
    ("vit-gpt2", "--vocab-size", "70000"): "--vocab-size 70000: a tiny model's sizes are at most",
    ("vit-gpt2", "--seed", "-1"): "--seed -1: a whole number from 0 to 2**64 - 1",
    ("vit-gpt2", "--seed", str(2 ** 64)): "a whole number from 0 to 2**64 - 1",
}


@pytest.mark.parametrize("args", list(REFUSED), ids=" ".join)
def test_refused_sizes_are_one_line_and_write_nothing(args, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main([args[0], str(out), *args[1:]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("dico_scale.models.tiny: error: ") and REFUSED[args] in err, err
    assert not out.exists()


def test_the_module_refuses_without_a_traceback(tmp_path):
    out = tmp_path / "t1"
    cmd = [sys.executable, "-m", "dico_scale.models.tiny", "vit-gpt2", str(out), "--image-size", "4"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "dico_scale.models.tiny: error: --image-size 4: vit-gpt2 cuts images into 8-pixel patches: at least 8"]
    assert not out.exists()


def test_the_sizes_the_repository_builds_are_allowed():
    """The defaults, the demo's (width 128, 4 heads, 64 px) and benchmarks/dico_step.py's --hf-size 1024,4,16,224."""
    for width, heads, image_size in ((32, 2, 32), (128, 4, 64), (1024, 16, 224)):
        assert all(family_problem(f, width, heads, image_size, 0) is None for f in FAMILIES)
    assert family_problem("vit-gpt2", 128, 4, 64, 49409) is None and 49409 <= MAX_SIZES["--vocab-size"]


def test_the_vocabulary_floor_is_the_tokenizers(tmp_path):
    """TOKENIZER_SIZE is what train_tokenizer gives; write() refuses a smaller vocabulary instead of raising it."""
    assert [len(train_tokenizer(f)) for f in ("vit-gpt2", "blip")] == [TOKENIZER_SIZE] * 2
    with pytest.raises(ValueError, match=f"vocab_size 3 is below the tokenizer's {TOKENIZER_SIZE} tokens"):
        write("vit-gpt2", str(tmp_path / "w"), vocab_size=3)
    assert not (tmp_path / "w").exists()
