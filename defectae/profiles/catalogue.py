"""`defectae profiles list` and `profiles show`."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from defectae import console
from defectae.profiles.load import available, pair_names, to_dict, to_toml
from defectae.profiles.schema import Profile


def list_profiles() -> dict[str, Any]:
    """Print the dataset and model profiles; any DATASET-MODEL pair is a profile."""
    datasets, models, pairs = available("datasets"), available("models"), pair_names()
    table = Table(title="profiles: combine as DATASET-MODEL")
    table.add_column("datasets")
    table.add_column("models")
    table.add_column("pair overrides")
    for i in range(max(len(datasets), len(models), len(pairs))):
        row = [lst[i] if i < len(lst) else "" for lst in (datasets, models, pairs)]
        table.add_row(*row)
    console.show(table)
    return {"datasets": datasets, "models": models, "pairs": pairs}


def show(profile: Profile) -> dict[str, Any]:
    """Print the fully resolved profile as TOML (on stdout unless --json)."""
    if not console.mode.json:
        print(to_toml(profile), end="")
    return to_dict(profile)
