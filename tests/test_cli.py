"""Smoke tests of both CLIs on tiny, as a user runs them (subprocesses)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    p = run("-m", "graphgen", "build", "--config", "tiny", "--out", str(out), "--seed", "5", "--n-layers", "1")
    assert p.returncode == 0, p.stderr
    assert "wrote" in p.stdout
    return out


def test_build_cli_writes_folder_with_overrides(built):
    m = json.loads((built / "manifest.json").read_text())
    assert m["config"]["seed"] == 5 and m["config"]["n_layers"] == 1
    for f in ("train_step.onnx", "training_model.onnx", "checkpoint", "forward.onnx", "weights.safetensors"):
        assert (built / f).is_file()


@pytest.mark.parametrize("runtime", ["ort-training", "ort"])
def test_train_cli_outputs_and_resume(built, tmp_path, runtime):
    out = tmp_path / "run"
    common = ["-m", "runtimes", "train", "--artifacts", str(built), "--runtime", runtime, "--batch", "2",
              "--seq", "32", "--eval-every", "2", "--eval-batches", "1", "--checkpoint-every", "2",
              "--sample-bytes", "20", "--no-progress", "--out", str(out)]
    p = run(*common, "--steps", "4")
    assert p.returncode == 0, p.stderr
    assert "validation loss" in p.stdout and "sample:" in p.stdout
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in rows)
    assert "val_loss" in rows[1] and "val_loss" in rows[3]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "sample.txt").read_text().startswith("def ")
    assert (out / "weights.safetensors").stat().st_size > 0
    p = run(*common, "--steps", "6", "--resume", str(out / "checkpoint.safetensors"))
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_train_cli_bad_artifacts_exit_2(tmp_path):
    p = run("-m", "runtimes", "train", "--artifacts", str(tmp_path / "none"), "--steps", "1", "--out", str(tmp_path / "o"))
    assert p.returncode == 2
    assert p.stderr.startswith("error:") and "does not exist" in p.stderr
