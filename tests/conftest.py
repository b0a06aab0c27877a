import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Reference facts about the published release live beside the checkout (../shared/reference).
REFERENCE_DIR = os.environ.get("UVIT_REFERENCE_DIR", os.path.join(os.path.dirname(ROOT), "shared", "reference"))


@pytest.fixture(scope="session")
def reference_dir():
    if not os.path.isdir(REFERENCE_DIR):
        pytest.skip(f"reference facts not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture(autouse=True)
def _seed():
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
