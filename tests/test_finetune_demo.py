"""`make finetune`'s script runs end to end (few steps): build --from-hf, train with the folder's
tokenizer, sample, export --hf, and the exported folder loads in transformers."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_finetune_demo_end_to_end(tmp_path):
    p = subprocess.run([sys.executable, "scripts/finetune_demo.py", "--work", str(tmp_path), "--steps", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "validation loss" in p.stdout and "make finetune HF=" in p.stdout
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tmp_path / "export")
    assert model.config.vocab_size == 1024 and (tmp_path / "export" / "tokenizer.json").is_file()
