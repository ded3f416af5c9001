"""CUDA tests (issue 23): every test here carries `@pytest.mark.gpu` and is skipped without CUDA.
TOKENFLOW_GPU_TESTS_ON_CPU=1 runs their logic on the CPU instead (to check the tests themselves
between GPU sessions; the figures then say nothing about a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

ON_CPU = os.environ.get("TOKENFLOW_GPU_TESTS_ON_CPU") == "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or ON_CPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
