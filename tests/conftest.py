import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def db(tmp_path, monkeypatch):
    """A warehouse path that FGM_DB does not override."""
    monkeypatch.delenv("FGM_DB", raising=False)
    return tmp_path / "w.duckdb"
