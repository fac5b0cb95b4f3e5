"""Shared fixtures (tiny models saved once per session as full-precision checkpoints) and the one rule for GPU
tests: a test marked ``gpu`` is skipped where torch sees no CUDA device (``pytest -m gpu`` runs them all)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fp_checkpoint(tmp_path_factory):
    """``fp_checkpoint(name)`` -> folder of a saved tiny fp32 model (built once per name)."""
    from grace_quant.testing import tiny_model

    cache: dict[str, str] = {}

    def make(name: str) -> str:
        if name not in cache:
            folder = tmp_path_factory.mktemp(name.replace(".", "_"))
            tiny_model(name).save_pretrained(folder)
            cache[name] = str(folder)
        return cache[name]

    return make
