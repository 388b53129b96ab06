"""Where each split's shards are: the config's shard specs, or the synthetic demo set (generated first when it is
missing). Every reader of a split asks here: training, the CIDEr-D reward's document frequencies, evaluate, the
demo and the benchmarks."""
from __future__ import annotations

from ..errors import ConfigError, first_line
from .pipeline import check_local_shards


def data_shards(cfg) -> dict[str, str]:
    """Shard specs per split; the synthetic demo set is generated first when it is missing."""
    if cfg.data.synthetic.enabled:
        from .synthetic import ensure_synthetic_dataset

        s = cfg.data.synthetic
        try:
            return ensure_synthetic_dataset(cfg.data.root, seed=s.seed, n_train=s.n_train, n_val=s.n_val,
                                            n_test=s.n_test, image_size=s.image_size,
                                            samples_per_shard=s.samples_per_shard)
        except (ValueError, OSError) as e:  # a user's folder, a file, a symlink loop, unwritable
            why = e if isinstance(e, ValueError) else first_line(e)
            raise ConfigError(f"bad value for config key 'data.root': {why}") from None
    return {"train": cfg.data.train_shards, "val": cfg.data.val_shards, "test": cfg.data.test_shards}


def split_shards(cfg, split: str, log_missing: bool = True) -> tuple[list[str], list[str]]:
    """(shards to read, local shards missing) of one split; ConfigError naming data.<split>_shards when none exists."""
    return check_local_shards(data_shards(cfg)[split], f"data.{split}_shards", log_missing)


def training_shards(cfg, rank: int) -> tuple[dict[str, list[str]], int]:
    """Shard lists of the train and val splits without the local shards that are missing (each logged once, on
    rank 0), and how many were missing. ConfigError when no shard of a split exists."""
    specs, shards, missing = data_shards(cfg), {}, 0
    for split in ("train", "val"):
        if specs.get(split):
            shards[split], gone = check_local_shards(specs[split], f"data.{split}_shards", rank == 0)
            missing += len(gone)
    return shards, missing
