"""Fixtures for the data tests: the dataset cache always lives in a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the default cache at a per-test folder so no test touches ~/.cache."""
    cache = tmp_path / "default-cache"
    monkeypatch.setenv("COMPATKIT_CACHE_DIR", str(cache))
    return cache
