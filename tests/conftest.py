import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED}: the real-data tests need the shared folder beside the repo")
    return SHARED


@pytest.fixture(scope="session")
def darmanis_path(shared_dir) -> Path:
    p = shared_dir / "data" / "darmanis2015_GSE67835.h5ad"
    if not p.is_file():
        pytest.skip(f"{p} is absent")
    return p
