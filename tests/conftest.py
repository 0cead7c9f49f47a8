import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _in_process_workers(monkeypatch):
    """fgm-train grid and fgm-measure run their tasks in the test's own process, where
    monkeypatches reach them and no worker pays for importing torch again; the tests
    of the worker pool itself (test_pool.py) ask for processes with --workers."""
    monkeypatch.setenv("FGM_WORKERS", "1")


@pytest.fixture
def db(tmp_path, monkeypatch):
    """A warehouse path that FGM_DB does not override."""
    monkeypatch.delenv("FGM_DB", raising=False)
    return tmp_path / "w.duckdb"


GRID = """
name = "tiny"
dataset = "digits"
[axes]
width = [24, 32]
depth = [2, 3]
dropout = [0.0]
batch_size = [128]
optimizer = ["adam"]
learning_rate = [1e-3]
weight_decay = [0.0]
[train]
max_steps = 1500
lr_drop_steps = [1200]
estimate_batches = 10
trace_every = 25
"""


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("grid") / "tiny.toml"
    path.write_text(GRID)
    return path
