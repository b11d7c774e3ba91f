"""Shared pytest fixtures: the real SmolLM2 model (from the per-user cache) and shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VOCAB_DIR = SHARED / "fixtures" / "vocab"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1, downloaded once into the pyllm cache (the same one users get)."""
    from pyllm.models import ensure_model

    return ensure_model(quiet=True)


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    if not VOCAB_DIR.is_dir():
        pytest.skip(f"llama.cpp vocab fixtures not found at {VOCAB_DIR}")
    return VOCAB_DIR
