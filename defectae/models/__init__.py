"""Model zoo: plain nn.Modules found through one registry (see registry.py)."""

from defectae.models.registry import FAMILIES, Family, build_model, get_family, register

__all__ = ["FAMILIES", "Family", "build_model", "get_family", "register"]
