"""Model zoo: plain nn.Modules found through one registry (see registry.py).

Importing the package imports every family module, which registers its builders, as
torchvision.models does; the registry itself imports no family.
"""

from defectae.models import (  # noqa: F401
    ae,
    aitex_vae,
    cnnae,
    diffae,
    draem,
    featrecon,
    resnetae,
    revdist,
    specvae,
    vitae,
)
from defectae.models.registry import FAMILIES, Family, build_model, get_family, register

__all__ = ["FAMILIES", "Family", "build_model", "get_family", "register"]
