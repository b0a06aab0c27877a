import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)



@pytest.fixture(scope="session")
def reference_dir():
    """tests/data: facts about the original release (baofff/U-ViT at commit ce55170): its configs'
    values, the state-dict keys and shapes of its networks and of its autoencoder."""
    return os.path.join(ROOT, "tests", "data")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module: tiny models run faster so on a shared 2-core machine, and
    runs compared bit for bit must use the same thread count. Use with pytest.mark.usefixtures."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
