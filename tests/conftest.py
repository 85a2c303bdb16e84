"""Shared fixtures: artifact folders built once per test session."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.oracle and the packages, from any working directory
os.environ.setdefault("OMP_NUM_THREADS", "2")


def _build(tmp_path_factory, name: str, **overrides) -> Path:
    from graphgen.artifacts import build_artifacts
    from graphgen.config import GPT2Config

    out = tmp_path_factory.mktemp("artifacts") / name
    build_artifacts(GPT2Config.preset("tiny", **overrides), out, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory) -> Path:
    """tiny preset, index labels, default AdamW constants, seed 42, lcg init."""
    return _build(tmp_path_factory, "tiny-index")


@pytest.fixture(scope="session")
def tiny_dense(tmp_path_factory) -> Path:
    """tiny preset, dense labels."""
    return _build(tmp_path_factory, "tiny-dense", labels="dense")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """An artifact folder built --from-hf on a small Hugging Face folder made locally (tests/hf_util.py):
    a byte-level BPE of 300 ids in tokenizer.json, context 32."""
    from tests.hf_util import build_hf_artifacts, make_hf_folder

    root = tmp_path_factory.mktemp("tiny-hf")
    return build_hf_artifacts(make_hf_folder(root / "hf"), root / "artifacts")


@pytest.fixture(scope="session", params=["index", "dense"])
def tiny_artifacts(request, tiny_index, tiny_dense) -> Path:
    return tiny_index if request.param == "index" else tiny_dense


@pytest.fixture
def enospc_after(monkeypatch):
    """Simulated full disk: os.fsync raises ENOSPC once armed (works without root)."""
    state = {"armed": False}
    real = os.fsync

    def fsync(fd):
        if state["armed"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    from contract import files as files_mod

    monkeypatch.setattr(files_mod.os, "fsync", fsync)
    return state
