"""TOML profiles in, frozen typed dataclasses out."""

from defectae.profiles.load import (
    available,
    flatten,
    from_dict,
    load_written,
    resolve,
    to_dict,
    to_toml,
    write_profile,
)
from defectae.profiles.schema import (
    AugmentConfig,
    CorruptionConfig,
    DatasetConfig,
    LossConfig,
    ModelConfig,
    Profile,
    ScoreConfig,
    TileConfig,
    TrainConfig,
)

__all__ = [
    "AugmentConfig",
    "CorruptionConfig",
    "DatasetConfig",
    "LossConfig",
    "ModelConfig",
    "Profile",
    "ScoreConfig",
    "TileConfig",
    "TrainConfig",
    "available",
    "flatten",
    "from_dict",
    "load_written",
    "resolve",
    "to_dict",
    "to_toml",
    "write_profile",
]
