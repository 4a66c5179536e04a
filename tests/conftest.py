"""Shared fixtures: GPU tests are marked `gpu` and skipped where no GPU is usable."""

import pytest

import hstu_kvcache


def pytest_collection_modifyitems(config, items):
    if hstu_kvcache.cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a CUDA build of hstu_kvcache")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
