"""data.root of the synthetic set, as a run reads it: a folder its shard patterns cannot carry, a symlink loop or no
folder at all is one line naming data.root (the key the user set), before anything is generated."""
import pytest
from helpers import REPO

from dico_scale.config import load_config
from dico_scale.data.splits import data_shards
from dico_scale.errors import ConfigError


def _error(root) -> str:
    cfg = load_config(str(REPO / "configs/demo/evaluator.yaml"), [f"data.root={root}"], training=False)
    with pytest.raises(ConfigError) as e:
        data_shards(cfg)
    return str(e.value)


@pytest.mark.parametrize("name,marks", [("br{a,b}", "{ }"), ("co::lon", "::"), ("st*r", "*")])
def test_a_root_the_shard_patterns_would_expand(tmp_path, name, marks):
    """Brace expansion and '::' turned the patterns into other paths, refused as data.train_shards (never set)."""
    root = tmp_path / name / "data"
    assert _error(root) == (f"bad value for config key 'data.root': '{root}' holds {marks}, which the shard patterns "
                            "built from it would expand: give the synthetic set a plain folder name")
    assert list(tmp_path.iterdir()) == []  # nothing generated first


def test_a_symlink_loop_or_an_empty_root(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert _error(tmp_path / "loop" / "data") == (
        f"bad value for config key 'data.root': '{tmp_path}/loop/data' runs into a symlink loop")
    assert _error("") == ("bad value for config key 'data.root': no folder given for the synthetic set (an empty "
                          "path)")  # not the working directory, whatever it is
