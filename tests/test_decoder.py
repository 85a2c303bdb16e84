"""decoder.onnx and ``python -m runtimes sample``: the cached decoder computes forward.onnx's
logits, greedy generation is the same as without a cache and as an independent model's,
and bad options are refused in one line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from contract import KV_KINDS, past_name, present_name
from runtimes.__main__ import main
from runtimes.artifacts import load_artifacts
from runtimes.checkpoint import Checkpoint, save_checkpoint
from runtimes.errors import ArtifactError, InputError
from runtimes.sample import BYTES, Decoder, generate, pick, tokenizer_for
from tests.oracle.torch_gpt2 import TorchGPT2, random_weights

ATOL = RTOL = 1e-5


@pytest.fixture(scope="module")
def art(tiny_index):
    return load_artifacts(tiny_index)


@pytest.fixture(scope="module")
def weights(art):
    """Random weights, biases and gains included, large enough that the logits spread
    (greedy choices far from ties) and that a misplaced bias shows."""
    return random_weights(art.config, seed=7, scale=0.15)


def _sessions(folder):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    opts = dict(sess_options=so, providers=["CPUExecutionProvider"])
    return (ort.InferenceSession(str(folder / "forward.onnx"), **opts),
            ort.InferenceSession(str(folder / "decoder.onnx"), **opts))


def _empty_cache(cfg, batch):
    dh = cfg["d_model"] // cfg["n_heads"]
    return {past_name(layer, kind): np.zeros((batch, cfg["n_heads"], 0, dh), np.float32)
            for layer in range(cfg["n_layers"]) for kind in KV_KINDS}


def _forward_greedy(fwd, weights, prompt, n):
    """forward.onnx on the growing sequence, argmax of the last position; also the smallest
    gap between the best and second-best logit seen (how far each choice is from a tie)."""
    ids, gap = list(prompt), np.inf
    for _ in range(n):
        t = len(ids)
        logits = fwd.run(["logits"], {"tokens": np.array([ids]), "positions": np.arange(t)[None, :], **weights})[0]
        top2 = np.sort(logits[0, -1])[-2:]
        gap = min(gap, float(top2[1] - top2[0]))
        ids.append(int(np.argmax(logits[0, -1])))
    return ids[len(prompt):], gap


# --------------------------------------------------------------------------- the graph
def test_io_is_recorded_in_the_manifest(art):
    io = art.model_io("decoder.onnx")
    cfg = art.config
    names = [v["name"] for v in io["inputs"]]
    cache = [past_name(layer, kind) for layer in range(cfg["n_layers"]) for kind in KV_KINDS]
    assert names == ["tokens", "positions", *art.param_names, *cache]
    assert io["inputs"][0] == {"name": "tokens", "dtype": "int64", "shape": ["batch", "seq"]}
    dh = cfg["d_model"] // cfg["n_heads"]
    assert io["inputs"][-1] == {"name": cache[-1], "dtype": "float32", "shape": ["batch", cfg["n_heads"], "past", dh]}
    assert io["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch", "seq", cfg["vocab"]]}
    assert [v["name"] for v in io["outputs"][1:]] == [c.replace("past.", "present.") for c in cache]
    assert io["outputs"][1]["shape"] == ["batch", cfg["n_heads"], "past+seq", dh]
    model = onnx.load(str(art.path("decoder.onnx")))
    assert {(o.domain, o.version) for o in model.opset_import} == {("", art.manifest["opset"])}


@pytest.mark.parametrize("t", [64, 17, 1])
def test_prefill_logits_equal_forward(art, weights, t):
    fwd, dec = _sessions(art.folder)
    cfg = art.config
    tokens = np.random.default_rng(t).integers(0, cfg["vocab"], (2, t))
    positions = np.tile(np.arange(t), (2, 1))
    want = fwd.run(["logits"], {"tokens": tokens, "positions": positions, **weights})[0]
    out = dec.run(None, {"tokens": tokens, "positions": positions, **weights, **_empty_cache(cfg, 2)})
    np.testing.assert_allclose(out[0], want, rtol=RTOL, atol=ATOL)
    dh = cfg["d_model"] // cfg["n_heads"]
    assert all(o.shape == (2, cfg["n_heads"], t, dh) for o in out[1:])


@pytest.mark.parametrize("prefill", [1, 9])
def test_decode_steps_equal_forward_on_the_whole_sequence(art, weights, prefill):
    """Prefill, then one token at a time up to the context: each step's logits are forward.onnx's
    at that position of the whole sequence (two sequences at once)."""
    fwd, _ = _sessions(art.folder)
    cfg = art.config
    c = cfg["context"]
    tokens = np.random.default_rng(prefill).integers(0, cfg["vocab"], (2, c))
    want = fwd.run(["logits"], {"tokens": tokens, "positions": np.tile(np.arange(c), (2, 1)), **weights})[0]
    dec = Decoder(art, weights, threads=2)
    dec.reset(2)
    got = [dec(tokens[:, :prefill])]
    for t in range(prefill, c):
        got.append(dec(tokens[:, t:t + 1]))
    got = np.stack(got, axis=1)  # (2, c - prefill + 1, vocab): positions prefill-1 .. c-1
    np.testing.assert_allclose(got, want[:, prefill - 1:], rtol=RTOL, atol=ATOL)
    assert dec.length == c
    with pytest.raises(InputError, match="exceed the context"):
        dec(tokens[:, :1])


def test_reference_evaluator_runs_the_decoder_as_shipped(art, weights):
    """onnx's own evaluator, no overrides: a prefill of 5 and a step on a cache of 5."""
    _, dec = _sessions(art.folder)
    ref = ReferenceEvaluator(str(art.path("decoder.onnx")))
    cfg = art.config
    tokens = np.random.default_rng(3).integers(0, cfg["vocab"], (1, 6))
    feeds = {"tokens": tokens[:, :5], "positions": np.arange(5)[None, :], **weights, **_empty_cache(cfg, 1)}
    for step in range(2):
        want = dec.run(None, feeds)
        got = ref.run(None, feeds)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
        names = [present_name(layer, kind) for layer in range(cfg["n_layers"]) for kind in KV_KINDS]
        feeds = {"tokens": tokens[:, 5:], "positions": np.array([[5]]), **weights,
                 **{n.replace("present.", "past."): v for n, v in zip(names, want[1:])}}


# --------------------------------------------------------------------------- greedy generation
def _oracle_greedy(cfg, weights, prompt, n):
    """The PyTorch oracle (tests/oracle, written from docs/semantics.md) on the growing sequence."""
    model = TorchGPT2(cfg, weights, threads=2)
    ids = list(prompt)
    for _ in range(n):
        logits = model.logits(np.array([ids]), np.arange(len(ids))[None, :])
        ids.append(int(np.argmax(logits[0, -1])))
    return ids[len(prompt):]


def test_greedy_sample_equals_forward_and_an_independent_model(art, weights):
    cfg = art.config
    prompt = list(b"def f(x):")
    n = cfg["context"] - len(prompt) + 1  # every position, up to a full context
    fwd, _ = _sessions(art.folder)
    want, gap = _forward_greedy(fwd, weights, prompt, n)
    assert gap > 1e-3, "a choice is near a tie; pick other test weights"
    got, at_context = generate(Decoder(art, weights, threads=2), prompt, n + 5, temperature=0)
    assert at_context and got == want
    try:
        from bench.decode import hf_greedy, hf_gpt2
        import transformers  # noqa: F401
    except ImportError:  # the oracle is the independent model until transformers is installed
        assert got == _oracle_greedy(cfg, weights, prompt, n)
    else:
        assert got == hf_greedy(hf_gpt2(cfg, weights), prompt, n)


def test_sample_cli_streams_the_greedy_text(art, weights, tmp_path, capsys):
    """From a checkpoint (its parameters, its recorded artifact folder): stdout is the prompt
    and the greedy continuation, decoded from bytes."""
    ckpt = tmp_path / "c.safetensors"
    save_checkpoint(ckpt, Checkpoint(runtime="ort", step=3, artifacts=str(art.folder.resolve()),
                                     fingerprint=art.fingerprint, params=weights))
    prompt = "héllo"
    fwd, _ = _sessions(art.folder)
    want, _ = _forward_greedy(fwd, weights, list(prompt.encode()), 20)
    rc = main(["sample", "--checkpoint", str(ckpt), "--prompt", prompt, "--max-new-tokens", "20",
               "--temperature", "0", "--threads", "1"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out == prompt + bytes(want).decode("utf-8", errors="replace")
    assert out.err == ""


def test_sampling_is_seeded_and_stops_at_the_context(art, weights, capsys):
    args = ["sample", "--artifacts", str(art.folder), "--prompt", "x" * 60, "--max-new-tokens", "50", "--seed", "4"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert main(args) == 0
    second = capsys.readouterr()
    assert first.out == second.out and first.out.startswith("x" * 60)
    # 60 prompt bytes + 5 tokens: the 5th is predicted from a full context of 64
    assert "stopped after 5 of 50 tokens: the sequence fills the context (64 tokens)" in first.err


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-0.1"], "--temperature must be a finite number >= 0"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "y" * 65], "--prompt is 65 tokens, longer than the context (64)"),
    (["--top-k", "many"], "argument --top-k: invalid int value"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_bad_options_exit_2_with_one_line(art, capsys, argv, message):
    argv = ["sample", "--artifacts", str(art.folder), "--prompt", "x", *argv]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own checks
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_folder_without_decoder_is_refused_with_a_rebuild_hint(art, tmp_path, capsys):
    folder = tmp_path / "old"
    folder.mkdir()
    for f in art.folder.iterdir():
        if f.name != "decoder.onnx":
            (folder / f.name).write_bytes(f.read_bytes())
    m = json.loads((folder / "manifest.json").read_text())
    del m["files"]["decoder.onnx"], m["models"]["decoder.onnx"]
    (folder / "manifest.json").write_text(json.dumps(m))
    assert main(["sample", "--artifacts", str(folder), "--prompt", "x"]) == 2
    assert "has no decoder.onnx" in capsys.readouterr().err


# --------------------------------------------------------------------------- token choice, tokenizer
def test_pick_rules():
    rng = np.random.default_rng(0)
    logits = np.array([1.0, 3.0, 2.0, 3.0, -1.0], np.float32)
    assert pick(logits, 0, 0, 1.0, rng) == 1  # greedy: the lowest id of a tie
    assert {pick(logits, 1.0, 2, 1.0, rng) for _ in range(200)} == {1, 3}  # top-2
    assert {pick(logits, 1.0, 3, 1.0, rng) for _ in range(300)} == {1, 2, 3}
    # top-p: p = softmax = [.054, .397, .146, .397, .007]; ids 1 and 3 hold .793, with 2 .939
    assert {pick(logits, 1.0, 0, 0.5, rng) for _ in range(200)} == {1, 3}
    assert {pick(logits, 1.0, 0, 0.79, rng) for _ in range(200)} == {1, 3}
    assert {pick(logits, 1.0, 0, 0.8, rng) for _ in range(300)} == {1, 2, 3}
    assert {pick(logits, 1.0, 0, 1e-6, rng) for _ in range(50)} == {1}  # the most probable, lower id first
    draws = [pick(logits, 1e-3, 0, 1.0, rng) for _ in range(100)]  # low temperature: the two maxima
    assert set(draws) == {1, 3}
    with pytest.raises(InputError, match="prompt is empty"):
        generate(None, [], 5)


def test_tokenizer_for_reads_the_manifest(art):
    assert tokenizer_for(art) is BYTES
    for spec in ({"kind": "bytes"}, "bytes"):
        assert tokenizer_for(type(art)(art.folder, {**art.manifest, "tokenizer": spec})) is BYTES
    with pytest.raises(ArtifactError, match="tokenizer kind 'bpe'"):
        tokenizer_for(type(art)(art.folder, {**art.manifest, "tokenizer": {"kind": "bpe"}}))
    text = "añ€😀"
    ids = BYTES.encode(text)
    stream = BYTES.stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.end() == text == BYTES.decode(ids)
    assert pieces[:2] == ["a", ""]  # a split character waits for its last byte
    partial = BYTES.stream()
    assert partial.push(0xE2) == "" and partial.end() == "\ufffd"
    assert BYTES.decode([104, 300, 105]) == "h\ufffdi"
