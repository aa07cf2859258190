"""One registry of model families, with one builder signature for all of them.

A family is a builder `fn(in_channels: int, input_size: int, **args) -> nn.Module`.
Every model maps (B, C, H, W) in [0, 1] to a dict with at least "recon" (B, C, H, W);
VAEs add "mu" and "logvar", models with a latent code add "z".
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from defectae.errors import DefectaeError

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class Family:
    name: str
    builder: Builder
    summary: str
    is_vae: bool = False
    whole_image: bool = False  # trained and tested on whole images (no tiling), e.g. the AITEX VAEs
    default_size: int = 128


FAMILIES: dict[str, Family] = {}


def register(
    name: str,
    summary: str,
    *,
    is_vae: bool = False,
    whole_image: bool = False,
    default_size: int = 128,
) -> Callable[[Builder], Builder]:
    """Decorator adding a builder to the registry under `name`."""

    def wrap(fn: Builder) -> Builder:
        if name in FAMILIES:
            raise ValueError(f"model family {name!r} registered twice")
        FAMILIES[name] = Family(name, fn, summary, is_vae, whole_image, default_size)
        return fn

    return wrap


def get_family(name: str) -> Family:
    """The registered family, or a user error naming the nearest valid name."""
    if name not in FAMILIES:
        near = difflib.get_close_matches(name, list(FAMILIES), n=1)
        hint = (
            f"; did you mean '{near[0]}'?"
            if near
            else f"; expected one of {', '.join(sorted(FAMILIES))}"
        )
        raise DefectaeError(f"model.family '{name}': unknown family{hint}")
    return FAMILIES[name]


def build_model(
    family: str, in_channels: int, input_size: int, args: dict | None = None
) -> nn.Module:
    """Build a family's model, turning unknown or ill-typed arguments into user errors."""
    fam = get_family(family)
    args = dict(args or {})
    params = inspect.signature(fam.builder).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not accepts_any:
        for key in args:
            if key not in params or key in ("in_channels", "input_size"):
                valid = [p for p in params if p not in ("in_channels", "input_size")]
                near = difflib.get_close_matches(key, valid, n=1)
                hint = f"; did you mean '{near[0]}'?" if near else f"; valid: {', '.join(valid)}"
                raise DefectaeError(
                    f"model.args.{key}: unknown argument for family '{family}'{hint}"
                )
    if in_channels not in (1, 3):
        raise DefectaeError(f"in_channels {in_channels}: expected 1 (gray) or 3 (rgb)")
    return fam.builder(in_channels=in_channels, input_size=input_size, **args)
