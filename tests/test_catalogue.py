"""`defectae models`: every family listed with its parameter count and FLOPs."""

from __future__ import annotations

import pytest
from torch import nn

from defectae.models import FAMILIES, get_family
from defectae.models.catalogue import describe
from defectae.models.stats import count_parameters, flops_per_sample


def test_flops_of_a_single_conv_match_the_hand_count() -> None:
    conv = nn.Conv2d(1, 4, kernel_size=3, padding=1, bias=False)
    # 2 FLOPs per multiply-add: H*W*Cout*Cin*k*k MACs
    assert flops_per_sample(conv, channels=1, size=8) == 2 * 8 * 8 * 4 * 1 * 9
    assert count_parameters(conv) == 36


def test_every_family_is_registered() -> None:
    get_family("ae")
    expected = {
        "ae",
        "aee",
        "dae",
        "daee",
        "vae1",
        "vae2",
        "vae3",
        "vae4",
        "vae5",
        "vae6",
        "vae8",
        "specvae",
        "cnnae",
        "resnetae",
        "vitae",
        "diffae",
    }
    assert expected <= set(FAMILIES)


@pytest.mark.parametrize("family", ["ae", "vae1"])
def test_describe_reports_size_and_cost(family: str) -> None:
    row = describe(family)
    assert row["parameters"] > 0 and row["flops_per_patch"] > 0
    assert row["input_size"] == FAMILIES[family].default_size
