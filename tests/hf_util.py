"""A small Hugging Face GPT-2 folder made locally and built into artifacts, for the tests of
code that reads an artifact folder's tokenizer (the hosts, train's sample).

The folder is what ``save_pretrained`` writes for a random ``GPT2LMHeadModel`` plus a
byte-level BPE trained with ``tokenizers`` on the page's bundled text, with
``<|endoftext|>`` as its special token; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "hosts" / "web" / "corpus.txt"
SPECIAL = "<|endoftext|>"
# vocab 300 (not a multiple of 64): 256 bytes, the special token and 43 merges
SHAPE = dict(n_embd=32, n_head=4, n_layer=2, n_positions=32, vocab_size=300)

# Text the byte-level BPE must split exactly as Python's `tokenizers` does: accents, CJK, emoji
# (4-byte UTF-8, with a skin-tone modifier), a ligature, no-break and zero-width spaces, runs of
# spaces, tabs and newlines, contractions and digits, and the special token inside and around words.
TRICKY = [
    "héllo wörld — naïve café 東京 😀👍🏽 ﬁ",
    "  leading spaces\n\n\n   and   runs\t\ttabs  \n",
    "a<|endoftext|>b <|endoftext|> c<|endoftext|><|endoftext|>\n<|endoftext|",
    "it's don't I'M we'll 123 4567 3.14",
    "def f(x):\n    return x**2  # square\n",
    "\u200b\u00a0nbsp\u3000ideographic",
    " ",
    "",
]


def tricky_text() -> bytes:
    """A training text for the hosts: a byte-order mark (Python's "utf-8" keeps it), TRICKY, the
    page's corpus three times, and invalid UTF-8 (replaced by U+FFFD, as Python reads it)."""
    return ("\ufeff" + "".join(TRICKY) + CORPUS.read_text() * 3).encode() + b"\xff\xfe invalid UTF-8 \xe6\x9d\n"


def save_hf(folder: Path, shape: dict, dtype=None, shard: str | None = None, seed: int = 0) -> Path:
    """A GPT2LMHeadModel of ``shape`` with random weights (biases and LayerNorms too) saved in ``folder``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(bos_token_id=0, eos_token_id=0, **shape))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # LayerNorm gains 1 and biases 0 at init: make them count
                p.add_(torch.randn_like(p) * 0.1)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return folder


def make_hf_folder(folder: Path, shape: dict = SHAPE, seed: int = 0) -> Path:
    """save_hf's model plus a byte-level BPE tokenizer.json trained on the page's corpus."""
    import tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator([CORPUS.read_text()], vocab_size=shape["vocab_size"], min_frequency=2,
                            special_tokens=[SPECIAL], show_progress=False)
    tok.save(str(folder / "tokenizer.json"))
    return save_hf(folder, shape, seed=seed)


def build_hf_artifacts(hf: Path, out: Path) -> Path:
    """``python -m graphgen build --from-hf HF --out OUT``, in this process."""
    from graphgen import __main__ as build_cli

    assert build_cli.main(["build", "--from-hf", str(hf), "--out", str(out)]) == 0
    return out
