"""``python -m runtimes export --onnx``: transformers.js (``@huggingface/transformers``, pinned in
tests/transformersjs/package-lock.json) loads the folder from disk and its text-generation
pipeline, greedy, produces the token ids of this project's sampler (runtimes.sample.generate
at temperature 0) on a byte folder and on an imported BPE folder."""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from runtimes.__main__ import main
from runtimes.artifacts import load_artifacts
from runtimes.sample import Decoder, generate, tokenizer_for
from tests.oracle.torch_gpt2 import random_weights
from tests.test_huggingface import art_a, bpe, hf_a  # noqa: F401  (fixtures: an imported BPE folder)

JS = Path(__file__).resolve().parent / "transformersjs"
STAMP = JS / "node_modules" / ".installed"  # touched after `npm ci` (here and by make test)
NEEDED = "node_modules/@huggingface/transformers/package.json"
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def node() -> str:
    """tests/transformersjs/node_modules from the lockfile (npm ci when missing or stale)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("the transformers.js test needs Node.js (>= 18) and npm on PATH")
    lock = JS / "package-lock.json"
    lock_path = Path(tempfile.gettempdir()) / f"gpt2-onnx-tjs-npm-{hashlib.sha1(str(JS).encode()).hexdigest()[:12]}.lock"
    with open(lock_path, "w") as lock_file:  # two test runs must not `npm ci` into one folder at once
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        fresh = STAMP.is_file() and STAMP.stat().st_mtime >= lock.stat().st_mtime
        if not fresh or not (JS / NEEDED).is_file():
            npm = shutil.which("npm")
            if npm is None:
                pytest.fail("tests/transformersjs/node_modules is missing or stale and npm is not on PATH")
            # no install scripts: onnxruntime-node ships its CPU binaries, sharp takes its own from @img/*
            proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=JS,
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"npm ci in tests/transformersjs failed:\n{proc.stdout}\n{proc.stderr}"
            STAMP.touch()
    return node


def transformersjs_generate(node: str, folder: Path, prompt: str) -> dict:
    proc = subprocess.run([node, str(JS / "generate.mjs"), str(folder), prompt, str(NEW_TOKENS)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"transformers.js failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ours(art, params, prompt: str) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy ids) of runtimes.sample."""
    ids = tokenizer_for(art).encode(prompt)
    new, _ = generate(Decoder(art, params, threads=1), ids, max_new_tokens=NEW_TOKENS, temperature=0.0)
    return ids, list(new)


def export(capsys, out: Path, *argv: str) -> Path:
    assert main(["export", "--onnx", str(out), *argv]) == 0, capsys.readouterr().err
    return out


def test_byte_folder_greedy_ids_equal_the_sampler(node, tiny_index, tmp_path, capsys):
    from safetensors.numpy import save_file

    art = load_artifacts(tiny_index)
    params = {n: np.asarray(v, np.float32) for n, v in random_weights(art.config, seed=7, scale=0.15).items()}
    save_file(params, str(tmp_path / "weights.safetensors"))
    out = export(capsys, tmp_path / "tjs", "--weights", str(tmp_path / "weights.safetensors"),
                 "--artifacts", str(tiny_index))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "config.json", "generation_config.json", "gpt2-onnx-export.json", "onnx/model.onnx", "tokenizer.json",
        "tokenizer_config.json"]
    prompt = "def f(x):"
    prompt_ids, new = ours(art, params, prompt)
    assert prompt_ids == list(prompt.encode())
    assert len(set(new)) > 2  # random weights: more than a repeated byte, so the comparison means something
    got = transformersjs_generate(node, out, prompt)
    assert got["ids"] == prompt_ids + new
    assert got["text"].startswith(prompt)
    # an earlier export is replaced in place
    export(capsys, out, "--weights", str(tmp_path / "weights.safetensors"), "--artifacts", str(tiny_index))


def test_bpe_folder_greedy_ids_equal_the_sampler(node, art_a, tmp_path, capsys):
    art = load_artifacts(art_a)
    out = export(capsys, tmp_path / "tjs", "--artifacts", str(art_a))
    prompt = "def f(x):"
    prompt_ids, new = ours(art, art.initial_weights(), prompt)
    assert len(prompt_ids) + NEW_TOKENS <= art.config["context"]  # transformers.js does not stop at the context
    end = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    if end in new:  # transformers.js stops after the end-of-text token
        new = new[: new.index(end) + 1]
    got = transformersjs_generate(node, out, prompt)
    assert got["ids"] == prompt_ids + new
    assert got["text"] == tokenizer_for(art).decode(prompt_ids + new)


def test_onnx_and_hf_together_are_refused(tmp_path, tiny_index, capsys):
    rc = main(["export", "--onnx", str(tmp_path / "a"), "--hf", str(tmp_path / "b"), "--artifacts", str(tiny_index)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--onnx" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
