"""Hugging Face GPT-2 folders in (graphgen build --from-hf) and out (runtimes export --hf).

Every folder here is made by the test: ``GPT2LMHeadModel(GPT2Config(...)).save_pretrained``
on tiny shapes, and a byte-level BPE trained with ``tokenizers`` on the page's bundled
text. Nothing is downloaded. Logits are compared with transformers' own GPT2LMHeadModel
on the same weights (relative error: max |ours - theirs| / max |theirs|, printed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import runtimes  # noqa: E402
from contract.errors import ArtifactError, CheckpointError  # noqa: E402
from contract.manifest import check_structure  # noqa: E402
from graphgen import __main__ as build_cli  # noqa: E402
from runtimes import __main__ as run_cli  # noqa: E402
from tests.hf_util import save_hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "hosts" / "web" / "corpus.txt"
RTOL = 1e-5

# n_inner unset (4 n_embd) and a vocab that is not a multiple of 64; float32, one file
SHAPE_A = dict(n_embd=32, n_head=4, n_layer=2, n_positions=32, vocab_size=300)
# n_inner set, the other tanh-GELU name; saved in bfloat16 and sharded
SHAPE_B = dict(n_embd=48, n_head=3, n_layer=1, n_positions=16, vocab_size=320, n_inner=80,
               activation_function="gelu_pytorch_tanh")




def cli(main, argv: list[str]) -> int:
    """A CLI's exit status, in this process (argparse errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def one_error_line(rc: int, capsys, *needles: str) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rc, err)
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def build(capsys, hf: Path, out: Path, *extra: str) -> Path:
    assert build_cli.main(["build", "--from-hf", str(hf), "--out", str(out), *extra]) == 0, capsys.readouterr().err
    return out


def rel_err(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def hf_logits(folder: Path, tokens: np.ndarray) -> np.ndarray:
    model, info = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def batch(cfg: dict, b: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.random.default_rng(seed).integers(0, cfg["vocab"], (b, cfg["context"]))
    return tokens, np.tile(np.arange(cfg["context"]), (b, 1))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    """A byte-level BPE of 300 ids trained on the page's text: tokenizer.json, vocab.json and merges.txt."""
    folder = tmp_path_factory.mktemp("bpe")
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator([CORPUS.read_text()], vocab_size=300, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    assert tok.get_vocab_size() == 300
    tok.save(str(folder / "tokenizer.json"))
    tok.save_model(str(folder))  # vocab.json, merges.txt
    return folder


@pytest.fixture(scope="module")
def hf_a(tmp_path_factory, bpe) -> Path:
    folder = save_hf(tmp_path_factory.mktemp("hf") / "gpt2-a", SHAPE_A)
    shutil.copy(bpe / "tokenizer.json", folder)
    return folder


@pytest.fixture(scope="module")
def art_a(tmp_path_factory, hf_a) -> Path:
    from graphgen.artifacts import build_artifacts
    from graphgen.hf_import import import_hf

    imported = import_hf(hf_a)
    out = tmp_path_factory.mktemp("art") / "a"
    build_artifacts(imported.config, out, log=lambda m: None, imported=imported)
    return out


# --------------------------------------------------------------------------- import
def test_import_a_logits_equal_transformers(hf_a, art_a):
    m = json.loads((art_a / "manifest.json").read_text())
    cfg = m["config"]
    assert (cfg["vocab"], cfg["context"], cfg["d_model"], cfg["n_heads"], cfg["d_ff"], cfg["n_layers"]) == (
        300, 32, 32, 4, 128, 2)
    assert m["source"]["kind"] == "huggingface"
    assert set(m["source"]["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert m["tokenizer"]["kind"] == "huggingface" and m["tokenizer"]["vocab_size"] == 300
    assert m["tokenizer"]["sha256"] == m["files"]["tokenizer.json"]["sha256"]
    assert (art_a / "tokenizer.json").read_bytes() == (hf_a / "tokenizer.json").read_bytes()
    tokens, positions = batch(cfg)
    ours = runtimes.load(art_a, runtime="ort").logits(tokens, positions)
    err = rel_err(ours, hf_logits(hf_a, tokens))
    print(f"import shape A (n_inner unset, vocab 300, float32): logits rel error {err:.2e}")
    assert err < RTOL


def test_import_b_bf16_sharded_logits_equal_transformers(tmp_path, capsys):
    hf = save_hf(tmp_path / "gpt2-b", SHAPE_B, dtype=torch.bfloat16, shard="40KB")
    assert (hf / "model.safetensors.index.json").is_file() and not (hf / "model.safetensors").exists()
    art = build(capsys, hf, tmp_path / "art")
    m = json.loads((art / "manifest.json").read_text())
    assert m["config"]["d_ff"] == 80 and m["config"]["vocab"] == 320
    assert m["tokenizer"] == {"kind": "bytes", "vocab_size": 256}
    assert "model.safetensors.index.json" in m["source"]["files"]
    tokens, positions = batch(m["config"])
    ours = runtimes.load(art, runtime="ort").logits(tokens, positions)
    err = rel_err(ours, hf_logits(hf, tokens))
    with capsys.disabled():
        print(f"import shape B (n_inner 80, vocab 320, bfloat16, sharded): logits rel error {err:.2e}")
    assert err < RTOL


def test_import_of_the_older_layout(tmp_path, hf_a, art_a, capsys):
    """Names without the ``transformer.`` prefix, causal-mask buffers saved beside the weights and a tied
    lm_head.weight (as older transformers releases wrote GPT-2): the same parameters."""
    from safetensors.numpy import load_file, save_file

    from runtimes.artifacts import load_artifacts

    hf = tmp_path / "hf"
    shutil.copytree(hf_a, hf)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(str(hf / "model.safetensors")).items()}
    ctx = SHAPE_A["n_positions"]
    for layer in range(SHAPE_A["n_layer"]):
        tensors[f"h.{layer}.attn.bias"] = np.tril(np.ones((ctx, ctx), np.float32))[None, None]  # (1, 1, C, C)
        tensors[f"h.{layer}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = tensors["wte.weight"]
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    art = build(capsys, hf, tmp_path / "art")
    ours, before = load_artifacts(art).initial_weights(), load_artifacts(art_a).initial_weights()
    for name, value in before.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


# --------------------------------------------------------------------------- train and export
def test_import_train_export_round_trip(tmp_path, hf_a, art_a, capsys):
    from runtimes.artifacts import load_artifacts
    from runtimes.tokenizer import cached_tokens, load_tokenizer

    run = tmp_path / "run"
    rc = run_cli.main(["train", "--artifacts", str(art_a), "--runtime", "ort", "--steps", "3", "--batch", "2",
                       "--seq", "16", "--eval-every", "3", "--eval-batches", "1", "--data", str(CORPUS),
                       "--sample-bytes", "8", "--no-progress", "--out", str(run)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "train tokens" in out.out
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)

    # the data was tokenized once, by the folder's tokenizer, into the run folder
    tok = load_tokenizer(load_artifacts(art_a))
    (cache,) = run.glob("tokens-*.bin")
    assert np.array_equal(np.fromfile(cache, dtype="<u2"), tok.encode(CORPUS.read_bytes().decode("utf-8")))
    before = cache.stat().st_mtime_ns
    assert np.array_equal(cached_tokens(tok, str(CORPUS), run, progress=False), np.fromfile(cache, dtype="<u2"))
    assert cache.stat().st_mtime_ns == before
    assert (run / "sample.txt").read_text().startswith("def")

    exp = tmp_path / "exported"
    assert run_cli.main(["export", "--hf", str(exp), "--checkpoint", str(run / "checkpoint.safetensors")]) == 0
    assert sorted(p.name for p in exp.iterdir()) == [
        "config.json", "generation_config.json", "gpt2-onnx-export.json", "model.safetensors", "tokenizer.json"]
    assert (exp / "tokenizer.json").read_bytes() == (art_a / "tokenizer.json").read_bytes()
    conf = json.loads((exp / "config.json").read_text())
    assert conf["eos_token_id"] == tok.token_to_id("<|endoftext|>") and conf["n_inner"] is None
    rt = runtimes.resume(run / "checkpoint.safetensors", runtime="ort")
    assert rt.step_count == 3
    tokens, positions = batch(rt.art.config, seed=1)
    ours = rt.logits(tokens, positions)
    err = rel_err(ours, hf_logits(exp, tokens))
    with capsys.disabled():
        print(f"import -> 3 steps on ort -> export: logits rel error {err:.2e}")
    assert err < RTOL
    assert not np.allclose(ours, runtimes.load(art_a, runtime="ort").logits(tokens, positions))  # it did train

    # the export imports again, to the same parameters; an earlier export is replaced, a user's folder never
    art2 = build(capsys, exp, tmp_path / "art2")
    again = load_artifacts(art2).initial_weights()
    for name, value in rt.parameters().items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)
    assert run_cli.main(["export", "--hf", str(exp), "--weights", str(run / "weights.safetensors"),
                         "--artifacts", str(art_a)]) == 0
    capsys.readouterr()
    one_error_line(run_cli.main(["export", "--hf", str(hf_a), "--artifacts", str(art_a)]), capsys,
                   "is not empty and is not an earlier export")


def test_export_of_a_byte_folder_writes_no_tokenizer(tmp_path, tiny_index, capsys):
    exp = tmp_path / "exp"
    assert run_cli.main(["export", "--hf", str(exp), "--artifacts", str(tiny_index)]) == 0
    assert "no tokenizer written" in capsys.readouterr().out
    assert not (exp / "tokenizer.json").exists()
    assert json.loads((exp / "config.json").read_text())["eos_token_id"] is None
    cfg = json.loads((tiny_index / "manifest.json").read_text())["config"]
    tokens, positions = batch(cfg)
    ours = runtimes.load(tiny_index, runtime="ort").logits(tokens, positions)
    err = rel_err(ours, hf_logits(exp, tokens))
    with capsys.disabled():
        print(f"tiny preset -> export: logits rel error {err:.2e}")
    assert err < RTOL


@pytest.mark.parametrize("args,needle", [
    ([], "give what to export"),
    (["--weights", "w.safetensors"], "--weights needs --artifacts"),
    (["--artifacts", "{tmp}/none"], "does not exist"),
    (["--checkpoint", "{tmp}/none.safetensors"], "does not exist"),
    (["--checkpoint"], "expected one argument"),
])
def test_export_bad_input_exit_2_with_one_line(tmp_path, capsys, args, needle):
    argv = ["export", "--hf", str(tmp_path / "exp"), *[a.format(tmp=tmp_path) for a in args]]
    one_error_line(cli(run_cli.main, argv), capsys, needle)
    assert not (tmp_path / "exp").exists()


def test_export_refuses_a_checkpoint_of_another_model(tmp_path, tiny_index, art_a, capsys):
    rt = runtimes.load(tiny_index, runtime="ort")
    rt.save(tmp_path / "tiny.ckpt")
    one_error_line(run_cli.main(["export", "--hf", str(tmp_path / "exp"), "--checkpoint", str(tmp_path / "tiny.ckpt"),
                                 "--artifacts", str(art_a)]), capsys, "another model")
    one_error_line(run_cli.main(["export", "--hf", str(art_a / "x"), "--artifacts", str(art_a)]), capsys,
                   "inside the artifact folder")


# --------------------------------------------------------------------------- tokenizers
def test_vocab_and_merges_become_tokenizer_json(tmp_path, hf_a, bpe, art_a, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(hf_a, hf)
    (hf / "tokenizer.json").unlink()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(bpe / name, hf)
    art = build(capsys, hf, tmp_path / "art")
    m = json.loads((art / "manifest.json").read_text())
    assert m["tokenizer"]["kind"] == "huggingface" and m["tokenizer"]["vocab_size"] == 300
    assert set(m["source"]["files"]) == {"config.json", "model.safetensors", "vocab.json", "merges.txt"}
    ours = tokenizers.Tokenizer.from_file(str(art / "tokenizer.json"))
    theirs = tokenizers.Tokenizer.from_file(str(bpe / "tokenizer.json"))
    text = CORPUS.read_text()[:2000] + "<|endoftext|> done"
    assert ours.encode(text).ids == theirs.encode(text).ids
    assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    # another tokenizer is another model: a checkpoint of art_a does not resume here
    rt = runtimes.load(art_a, runtime="ort")
    rt.save(tmp_path / "a.ckpt")
    with pytest.raises(CheckpointError, match="another model"):
        runtimes.resume(tmp_path / "a.ckpt", runtime="ort", artifacts=art)


def test_manifest_checks_the_tokenizer_entry(art_a):
    m = json.loads((art_a / "manifest.json").read_text())
    check_structure("manifest.json", m)
    for edit, needle in ((("vocab_size", 301), "larger than config.vocab"), (("sha256", "0" * 64), "tokenizer.sha256"),
                         (("kind", "sentencepiece"), "tokenizer"), (("file", "../t.json"), "tokenizer.file")):
        bad = json.loads(json.dumps(m))
        bad["tokenizer"][edit[0]] = edit[1]
        with pytest.raises(ArtifactError, match=needle):
            check_structure("manifest.json", bad)


def test_tokenizer_larger_than_the_vocab_is_refused(tmp_path, bpe, capsys):
    hf = save_hf(tmp_path / "hf", dict(SHAPE_A, vocab_size=280))
    shutil.copy(bpe / "tokenizer.json", hf)
    capsys.readouterr()  # save_pretrained's progress bar
    one_error_line(build_cli.main(["build", "--from-hf", str(hf), "--out", str(tmp_path / "art")]), capsys,
                   "300 token ids", "vocab_size 280")
    assert not (tmp_path / "art").exists()


# --------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return save_hf(tmp_path_factory.mktemp("hf") / "pristine", dict(SHAPE_A, n_layer=1))


def _set_config(key, value):
    def edit(folder: Path):
        conf = json.loads((folder / "config.json").read_text())
        conf[key] = value
        (folder / "config.json").write_text(json.dumps(conf))
    return edit


def _edit_weights(change):
    def edit(folder: Path):
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(folder / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return edit


def _pickle_only(folder: Path):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"never read")


REFUSALS = {
    "activation": (_set_config("activation_function", "relu"), ["activation_function", "'relu'"]),
    "exact gelu": (_set_config("activation_function", "gelu"), ["activation_function"]),
    "layer-scaled attention": (_set_config("scale_attn_by_inverse_layer_idx", True), ["scale_attn_by_inverse_layer_idx"]),
    "reordered upcast attention": (_set_config("reorder_and_upcast_attn", True), ["reorder_and_upcast_attn"]),
    "cross-attention": (_set_config("add_cross_attention", True), ["add_cross_attention"]),
    "untied config": (_set_config("tie_word_embeddings", False), ["tie_word_embeddings"]),
    "layer norm epsilon": (_set_config("layer_norm_epsilon", 1e-6), ["layer_norm_epsilon"]),
    "untied lm_head": (_edit_weights(lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"] + 1})),
                       ["lm_head.weight", "untied"]),
    "pytorch_model.bin only": (_pickle_only, ["pytorch_model.bin", "safetensors"]),
    "int weights": (_edit_weights(lambda t: t.update({"transformer.wte.weight": t["transformer.wte.weight"].astype(np.int32)})),
                    ["transformer.wte.weight", "I32"]),
    "extra tensor": (_edit_weights(lambda t: t.update({"transformer.h.0.crossattention.q_attn.weight": np.zeros((32, 32), np.float32)})),
                     ["crossattention"]),
    "missing tensor": (_edit_weights(lambda t: t.pop("transformer.h.0.mlp.c_fc.bias")), ["h.0.mlp.c_fc.bias"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_import_refusals_exit_2_with_one_line(tmp_path, pristine, capsys, case):
    edit, needles = REFUSALS[case]
    hf = tmp_path / "hf"
    shutil.copytree(pristine, hf)
    edit(hf)
    one_error_line(build_cli.main(["build", "--from-hf", str(hf), "--out", str(tmp_path / "art")]), capsys, *needles)
    assert not (tmp_path / "art").exists()


def test_from_hf_takes_no_preset_options(tmp_path, pristine, capsys):
    one_error_line(build_cli.main(["build", "--from-hf", str(pristine), "--n-layers", "2", "--out",
                                   str(tmp_path / "art")]), capsys, "--n-layers cannot be combined")
    one_error_line(build_cli.main(["build", "--from-hf", str(tmp_path / "none"), "--out", str(tmp_path / "art")]),
                   capsys, "is not a folder")


def test_greedy_sample_with_the_folders_tokenizer_equals_transformers_generate(hf_a, art_a):
    """`runtimes sample` on an imported folder encodes the prompt with its tokenizer.json and
    decodes what it generates with it; greedy ids equal transformers' greedy generate."""
    import torch
    from transformers import GPT2LMHeadModel

    from runtimes.artifacts import load_artifacts
    from runtimes.sample import Decoder, generate, tokenizer_for

    art = load_artifacts(art_a)
    tok = tokenizer_for(art)
    assert tok.kind == "huggingface"
    prompt = tok.encode("def f(x):\n    return")
    ours, _ = generate(Decoder(art, art.initial_weights()), prompt, max_new_tokens=12, temperature=0.0)
    model = GPT2LMHeadModel.from_pretrained(hf_a).eval()
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                pad_token_id=0)[0, len(prompt):].tolist()
    assert list(ours) == theirs
    stream = tok.stream()
    assert "".join(stream.push(i) for i in ours) + stream.end() == tok.decode(ours)
