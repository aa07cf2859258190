"""`defectae models`: every registered family with its size and cost at its default input size."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from defectae import console
from defectae.errors import DefectaeError
from defectae.models.registry import FAMILIES, build_model, get_family
from defectae.models.stats import count_parameters, flops_per_sample


def describe(name: str, channels: int = 1) -> dict[str, Any]:
    """Parameters and FLOPs per patch of one family built with its default arguments."""
    fam = get_family(name)
    model = build_model(name, channels, fam.default_size)
    return {
        "family": name,
        "summary": fam.summary,
        "input_size": fam.default_size,
        "channels": channels,
        "vae": fam.is_vae,
        "whole_image": fam.whole_image,
        "parameters": count_parameters(model),
        "flops_per_patch": flops_per_sample(model, channels, fam.default_size),
    }


def run() -> dict[str, Any]:
    """Print the model catalogue; return it for --json."""
    get_family("ae")  # loads the registry
    rows, unavailable = [], {}
    for name in console.track(sorted(FAMILIES), "measuring models"):
        try:
            rows.append(describe(name))
        except DefectaeError as err:  # e.g. a pretrained backbone whose weights are not installed
            unavailable[name] = str(err)
    table = Table(title="model families (1 channel, default size)")
    for col in ("family", "input", "parameters", "GFLOPs/patch", "description"):
        table.add_column(
            col, justify="right" if col in ("input", "parameters", "GFLOPs/patch") else "left"
        )
    for r in rows:
        table.add_row(
            r["family"],
            str(r["input_size"]),
            f"{r['parameters']:,}",
            f"{r['flops_per_patch'] / 1e9:.3f}",
            r["summary"],
        )
    console.show(table)
    for name, why in unavailable.items():
        console.warn(f"{name}: not measured; {why}")
    return {"models": rows, "unavailable": unavailable}
