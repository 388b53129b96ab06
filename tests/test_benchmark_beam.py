"""benchmarks/beam_vs_generate.py runs end to end on a tiny random VLM folder and synthetic test shards."""
import json
import os
import sys

import pytest

sys.path.insert(0, "benchmarks")
import beam_vs_generate  # noqa: E402


def test_beam_vs_generate_smoke(vlm_folders, tiny_shards, tmp_path, capsys):
    shards = os.path.join(os.path.dirname(tiny_shards["test"]), "test-*.tar")
    out = tmp_path / "beam.json"
    result = beam_vs_generate.main(["--folder", vlm_folders["qwen2-vl"], "--shards", shards, "--images", "3",
                                    "--beams", "3", "--max-len", "6", "--json", str(out)])
    assert result["images"] == 3 and json.loads(out.read_text()) == result
    same = result["same"]
    assert same == {"0.0": {"best": 3, "all": 3}, "1.0": {"best": 3, "all": 3}}  # generate's search, at both
    capsys.readouterr()  # the run's progress bars
    with pytest.raises(SystemExit) as e:  # no folder: one line, not a ConfigError traceback
        beam_vs_generate.main(["--folder", str(tmp_path / "none"), "--shards", shards])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "is not a transformers checkpoint folder" in err
