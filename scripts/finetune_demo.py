"""`make finetune`: the pretrained path end to end, on a Hugging Face folder.

With ``--hf DIR`` it fine-tunes that folder (a GPT-2 you downloaded yourself, e.g.
``huggingface-cli download gpt2 --local-dir gpt2``). Without it, it first makes a
small stand-in locally, so the demo needs no download: a byte-level BPE tokenizer
trained on the default corpus and a randomly initialised GPT2LMHeadModel saved with
``save_pretrained`` (the layout a downloaded checkpoint has; its weights are not
pretrained, so its "before" loss is that of an untrained model).

Then, each step a command a user would run: ``graphgen build --from-hf``,
``runtimes train`` with the folder's tokenizer, ``runtimes sample`` from the
checkpoint, and ``runtimes export --hf``. The validation losses before and after
are printed by train; everything goes under ``--work`` (default runs/finetune).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# The stand-in's shape: "small" for the demo, "gpt2" (GPT2Config's defaults: 124M parameters, 1,024
# positions, 50,257 ids of which the 1,024 of the local BPE are used) to time fine-tuning steps at
# GPT-2's size.
STANDIN = {
    "small": dict(n_positions=128, n_embd=128, n_layer=2, n_head=4),
    "gpt2": dict(),
}


def make_standin(folder: Path, size: str = "small") -> Path:
    """A GPT-2 in the Hugging Face layout (STANDIN[size]), with a BPE trained on the default corpus."""
    import tokenizers
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from runtimes.data import default_corpus

    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator([default_corpus(max_bytes=2_000_000)], vocab_size=1024, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    shape = STANDIN[size] if size == "gpt2" else {"vocab_size": tok.get_vocab_size(), **STANDIN[size]}
    cfg = transformers.GPT2Config(**shape, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def run(*args: str) -> None:
    print("+ python " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/finetune_demo.py", description=__doc__.splitlines()[0])
    p.add_argument("--hf", type=Path, default=None, help="a Hugging Face GPT-2 folder (default: make a small one)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "finetune", help="where everything is written")
    p.add_argument("--size", choices=sorted(STANDIN), default="small",
                   help="the stand-in's shape when no --hf is given (gpt2: GPT-2 124M's, to time its steps)")
    p.add_argument("--data", default=None, help="text to fine-tune on (default: the default corpus)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    a = p.parse_args(argv)
    hf = a.hf or make_standin(a.work / f"hf-standin-{a.size}", a.size)
    art, run_dir = a.work / "artifacts", a.work / "run"
    try:
        run("-m", "graphgen", "build", "--from-hf", str(hf), "--out", str(art))
        run("-m", "runtimes", "train", "--artifacts", str(art), "--out", str(run_dir), "--steps", str(a.steps),
            "--batch", str(a.batch), "--seq", str(a.seq), "--eval-every", str(max(1, a.steps // 3)),
            "--sample-bytes", "0", *(["--data", a.data] if a.data else []))
        run("-m", "runtimes", "sample", "--checkpoint", str(run_dir / "checkpoint.safetensors"),
            "--artifacts", str(art), "--prompt", "def ", "--max-new-tokens", "40", "--temperature", "0")
        print(flush=True)  # the sample streams without a final newline
        run("-m", "runtimes", "export", "--hf", str(a.work / "export"), "--checkpoint",
            str(run_dir / "checkpoint.safetensors"), "--artifacts", str(art))
    except subprocess.CalledProcessError as e:
        print(f"error: step failed with exit status {e.returncode}", file=sys.stderr)
        return 2
    if a.hf is None:
        print("\nThat was a small randomly initialised stand-in. To fine-tune a real GPT-2, download it yourself "
              "(e.g. huggingface-cli download gpt2 --local-dir gpt2) and run: make finetune HF=gpt2")
    print(f"fine-tuned weights: {run_dir}; transformers folder: {a.work / 'export'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
