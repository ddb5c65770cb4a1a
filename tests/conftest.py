"""Fixtures every test file may use: global torch state, a tiny corpus, trained run directories.

Under pytest-xdist (`--dist loadfile`) each worker is its own session: a session fixture is
built once per worker that needs it, and a file's tests all run on one worker.
"""

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The longest files first: the two workers take whole files in collection order, and a long
# file that starts last is waited for alone.
LONGEST_FIRST = ["test_train.py", "test_export.py", "test_stops.py", "test_elastic.py", "test_experiment.py"]


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = Path(str(item.fspath)).name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's own order is kept


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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, Path]:
    """(glob, cache_dir): tests.train_helpers' tiny corpus and a data cache, one pair per test
    file, so that a file's runs share one prepared cache and no file sees another's."""
    from tests.train_helpers import write_corpus

    root = tmp_path_factory.mktemp("corpus")
    return write_corpus(root / "corpus"), root / "cache"


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """name -> run directory of each of tests.ds_run_fixture.STANDARD_SPECS (ZeRO 0-3, 1 and 2
    ranks), trained once per worker for every file that reads them."""
    from tests.ds_run_fixture import STANDARD_SPECS, make_run_dirs

    return make_run_dirs(tmp_path_factory.mktemp("ds_runs"), STANDARD_SPECS)


@pytest.fixture(scope="session")
def exports(runs) -> dict[str, Path]:
    """name -> each run in `runs` exported to its default folder, RUN_DIR/hf (once per worker)."""
    from export import cli as export_hf

    return {name: export_hf.export(run_dir) for name, run_dir in runs.items()}
