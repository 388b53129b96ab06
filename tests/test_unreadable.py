"""Files that exist but cannot be read (no read permission; a folder above without search permission) are one line
naming the key and why, at config validation, never a PermissionError traceback. Root reads anything, so open()
itself refuses here for the files under test."""
import builtins
import errno

import pytest

from dico_scale.config import ConfigError, load_config

BLANK = ["evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from="]


@pytest.fixture
def unreadable(monkeypatch, tmp_path):
    """Paths whose open() fails as without read permission."""
    paths, real_open = set(), builtins.open

    def guarded(file, *args, **kwargs):
        if str(file) in paths:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", guarded)
    return paths


def test_unreadable_weights_are_one_line_naming_the_key(unreadable, tmp_path):
    from dico_scale.checks import read_problem
    from dico_scale.models.clip_weights import sniff_weights_format
    from dico_scale.models.weights import load_torch_file

    captioner_pt = tmp_path / "model.pt"
    captioner_pt.write_bytes(b"PK\x03\x04")  # there, but unreadable to this process
    unreadable.add(str(captioner_pt))
    for key, config in (("train.init_from", "dico.yaml"), ("evaluator.weights", "xe.yaml")):
        with pytest.raises(ConfigError) as e:
            load_config(f"configs/demo/{config}", BLANK + [f"{key}={captioner_pt}"])
        assert str(e.value) == (f"bad value for config key '{key}': '{captioner_pt}' cannot be read (Permission "
                                "denied)")
    with pytest.raises(ConfigError, match=r"cannot read weights '.*': cannot be read \(Permission denied\)"):
        load_torch_file(str(captioner_pt), "weights")  # evaluate, caption and export --checkpoint read through it
    with pytest.raises(ConfigError, match=r"cannot be read \(Permission denied\)"):
        sniff_weights_format(str(captioner_pt), "evaluator.weights")
    assert read_problem(str(tmp_path / "nope.pt")) == "does not exist"


def test_a_file_behind_a_folder_without_search_permission_cannot_be_reached(monkeypatch, tmp_path):
    import os

    from dico_scale.checks import read_problem

    hidden = tmp_path / "noexec" / "ev.pt"
    monkeypatch.setattr(os.path, "lexists", lambda p: False)  # what stat() says there without search permission
    monkeypatch.setattr(builtins, "open", lambda *a, **k: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied")))
    assert read_problem(str(hidden)) == "cannot be reached (Permission denied)"
