"""Shared test setup: every test runs with outputs under its own temporary DEFECTAE_HOME."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def output_mode(monkeypatch):
    """Each test starts with the console's default output mode (in-process CLI calls set it)."""
    from defectae import console

    monkeypatch.setattr(console, "mode", console.OutputMode())


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A temporary working folder for default output paths (work/, runs/)."""
    monkeypatch.setenv("DEFECTAE_HOME", str(tmp_path))
    return tmp_path
