import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _restore_global_torch_state():
    """Each test starts from the same seeds and default dtype, and leaves them as it found them."""
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture
def project_root():
    return ROOT
