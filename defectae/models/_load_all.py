"""Importing this module registers every model family."""

from defectae.models import ae, aitex_vae, cnnae, diffae, resnetae, specvae, vitae  # noqa: F401
