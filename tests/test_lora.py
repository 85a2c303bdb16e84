"""LoRA folders: build, train on every runtime that takes frozen inputs, against an independent oracle.

The oracle (tests/oracle/torch_lora.py) is the per-head PyTorch GPT-2 with PEFT's
adapters added, trained by torch.optim.AdamW over the adapters only. Tolerances
(float32): gradients 1e-5 relative per tensor (at init, where B = 0 and so every
gradient of A is exactly 0, and after 20 steps, at the runtime's adapters), losses over 20 steps 1e-4
absolute, adapters and moments after 20 steps 1e-4 relative; base weights
bit-identical before and after.

Adapters after 20 steps are held per tensor to 1e-4 in the L2 sense
(``||ours - torch|| / ||torch||``) and to 5e-4 element-wise (``max |ours - torch|
/ max |torch|``), not 1e-4 element-wise as full parameters are: B starts at zero,
so its values after 20 steps are only O(20 lr), and AdamW divides by sqrt(v), so an
element whose gradient is near zero, or whose first moment crosses zero, takes a
step that depends on the last bits of its gradient (both sides' gradients agree
to 1e-6). Measured element-wise: 8e-5 on tiny, 1.3e-4 on small; with eps 1e-8 a
first gradient at rounding level (tiny's h1.mlp.c_proj.lora_B[62, 1], 2e-8 against
1.3e-2) gave 9e-4, so eps is 1e-6 here (hp carries it at run time).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import runtimes
from contract.lora import check_lora
from tests.oracle.torch_lora import TorchGPT2LoRA
from tests.parity_util import F32, batches, floored_errors, rel_err, report
from tests.test_node_host import node_host  # noqa: F401  (the fixture: hosts/node's npm ci, once)

STEPS, LR, BETAS, EPS, WD = 20, 1e-3, (0.9, 0.999), 1e-6, 0.01  # eps: module docstring
RANK, ALPHA = 4, 8.0
ALL = ["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def build_lora(out: Path, preset: str = "tiny", rank: int = RANK, alpha: float = ALPHA, targets=ALL,
               recompute_attention: bool = False, **overrides) -> Path:
    from graphgen.artifacts import build_artifacts
    from graphgen.config import GPT2Config

    cfg = GPT2Config.preset(preset, **overrides)
    build_artifacts(cfg, out, log=lambda m: None, lora=check_lora(cfg.to_dict(), rank, alpha, list(targets), 0),
                    recompute_attention=recompute_attention)
    return out


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory) -> Path:
    # eps as the tests train (ort-training's optimizer model fixes it at build)
    return build_lora(tmp_path_factory.mktemp("lora") / "tiny-lora", eps=EPS)


def _oracle(art, threads: int = 1) -> TorchGPT2LoRA:
    return TorchGPT2LoRA(art.config, art.frozen_weights(), art.initial_weights(), alpha=art.lora["alpha"],
                         rank=art.lora["rank"], threads=threads)


def _at(rt, threads: int = 1) -> TorchGPT2LoRA:
    """An oracle at the runtime's current adapters: gradients after training compared at the same point
    (the two trajectories drift apart by ~1e-5 over 20 steps, which would swamp a 1e-5 gradient check)."""
    art = rt.art
    return TorchGPT2LoRA(art.config, art.frozen_weights(), rt.parameters(), alpha=art.lora["alpha"],
                         rank=art.lora["rank"], threads=threads)


def compare_adapters(title: str, ours: dict, want: dict) -> None:
    """Per tensor: 1e-4 in L2, 5e-4 element-wise (module docstring)."""
    l2 = {n: float(np.linalg.norm(ours[n].astype(np.float64) - want[n]) / np.linalg.norm(want[n])) for n in want}
    report(title + " (L2)", l2, 1e-4)
    report(title + " (element-wise)", {n: rel_err(ours[n], want[n]) for n in want}, 5e-4)


def _train_both(rt, oracle, train_batches):
    ours = [rt.step(*b, runtimes.make_hp(LR, *BETAS, EPS, WD, step=t + 1)) for t, b in enumerate(train_batches)]
    want = oracle.train(train_batches, lr=F32(LR), betas=(F32(BETAS[0]), F32(BETAS[1])), eps=F32(EPS),
                        weight_decay=F32(WD))
    return ours, want


_cache: dict = {}


def _tiny_results(name: str, folder: Path) -> dict:
    """Everything the tiny parity tests compare, computed once per runtime."""
    if name not in _cache:
        rt = runtimes.load(folder, runtime=name)
        o = _oracle(rt.art)
        base0 = rt.frozen()
        init_batch = batches(rt.art.config, 1, batch=3, seq=rt.art.config["context"], seed=7)[0]
        train_batches = batches(rt.art.config, STEPS, batch=2, seed=9)
        res = {"logits": (rt.logits(*init_batch[:2]), o.logits(*init_batch[:2])),
               "grads0": (rt.gradients(*init_batch), o.grads(*init_batch)[1])}
        res["losses"] = _train_both(rt, o, train_batches)
        res["grads20"] = (rt.gradients(*init_batch), _at(rt).grads(*init_batch)[1])
        res["params"] = (rt.parameters(), o.parameters())
        res["moments"] = (rt.moments(), o.moments())
        res["base"] = (base0, rt.frozen(), rt.art.frozen_weights())
        _cache[name] = res
    return _cache[name]


@pytest.fixture(params=["ort-training", "ort", "reference", "openvino"])
def tiny_run(request, tiny_lora):
    return request.param, _tiny_results(request.param, tiny_lora)


def test_step0_is_the_base_model(tiny_lora, tiny_index):
    """B starts at zero (PEFT's init), so the adapted model's logits are the base model's, bit for bit."""
    tok, pos, _ = batches({"labels": "index", "vocab": 256, "context": 64}, 1, batch=2, seed=5)[0]
    lora = runtimes.load(tiny_lora, runtime="ort")
    full = runtimes.load(tiny_index, runtime="ort")
    assert np.array_equal(lora.logits(tok, pos), full.logits(tok, pos))
    assert lora.art.frozen_weights().keys() == full.parameters().keys()
    a = lora.parameters()["h0.c_attn.lora_A"]  # (rank, d): Kaiming-uniform(a=sqrt(5)) bound 1/sqrt(d)
    assert a.shape == (RANK, 64) and 0.9 / 8 < np.abs(a).max() < 1 / 8 and not np.all(lora.parameters()["h0.c_attn.lora_B"])


def test_init_logits(tiny_run):
    name, r = tiny_run
    ours, want = r["logits"]
    report(f"{name} LoRA logits at init vs torch (absolute)", {"logits": float(np.abs(ours - want).max())}, 1e-5)


def test_gradients_at_init_and_after_training(tiny_run):
    name, r = tiny_run
    for when in ("grads0", "grads20"):
        ours, want = r[when]
        assert set(ours) == set(want)  # adapters only
        report(f"{name} LoRA {when} vs torch", floored_errors(ours, want), 1e-5)


def test_20_step_losses(tiny_run):
    name, r = tiny_run
    ours, want = r["losses"]
    report(f"{name} LoRA 20-step losses vs torch (absolute)",
           {f"step {i + 1}": abs(a - b) for i, (a, b) in enumerate(zip(ours, want))}, 1e-4)
    assert ours[-1] < ours[0] - 0.1  # it learns


def test_20_step_adapters_and_moments(tiny_run):
    name, r = tiny_run
    ours, want = r["params"]
    compare_adapters(f"{name} adapters after 20 steps", ours, want)
    (m, v), (wm, wv) = r["moments"]
    report(f"{name} first moments after 20 steps", floored_errors(m, wm), 1e-4)
    report(f"{name} second moments after 20 steps", floored_errors(v, wv), 1e-4)


def test_base_weights_bit_identical_after_training(tiny_run):
    name, r = tiny_run
    before, after, on_disk = r["base"]
    assert before.keys() == after.keys() == on_disk.keys()
    assert all(np.array_equal(before[n], after[n]) and np.array_equal(on_disk[n], after[n]) for n in before)


@pytest.fixture(scope="module")
def small_lora(tmp_path_factory) -> Path:
    return build_lora(tmp_path_factory.mktemp("lora") / "small-lora", "small", rank=8, alpha=16.0, eps=EPS)


@pytest.mark.parametrize("name", ["ort", "ort-training"])
def test_small_with_two_threads(name, small_lora):
    """A realistic size (small: d_model 256, 4 layers; rank 8, every target) on 2 intra-op threads:
    gradients at init and after 20 steps, the 20 losses, the adapters."""
    rt = runtimes.load(small_lora, runtime=name, threads=2, verify=False)
    o = _oracle(rt.art, threads=2)
    probe = batches(rt.art.config, 1, batch=16, seq=64, seed=3)[0]
    report(f"{name} LoRA gradients vs torch on small 16x64 at init, 2 threads",
           floored_errors(rt.gradients(*probe), o.grads(*probe)[1]), 1e-5)
    train_batches = batches(rt.art.config, STEPS, batch=2, seq=64, seed=9)
    ours, want = _train_both(rt, o, train_batches)
    report(f"{name} LoRA 20-step losses on small, 2 threads (absolute)",
           {f"step {i + 1}": abs(a - b) for i, (a, b) in enumerate(zip(ours, want))}, 1e-4)
    report(f"{name} LoRA gradients vs torch on small 16x64 after 20 steps (at its adapters), 2 threads",
           floored_errors(rt.gradients(*probe), _at(rt, threads=2).grads(*probe)[1]), 1e-5)
    compare_adapters(f"{name} LoRA adapters after 20 steps on small, 2 threads", rt.parameters(), o.parameters())


# --- the JavaScript hosts (the page's LoRA tests: tests/test_web_host.py) -----------------

def test_node_host_trains_a_lora_folder_like_python(node_host, tiny_lora, tmp_path):
    """hosts/node feeds the frozen base at every step and trains only the adapters: its losses
    and saved adapters equal the Python `ort` runtime's on the same batches to 1e-5, the
    tolerance of full folders (onnxruntime-node is another onnxruntime build than Python's)."""
    from safetensors.numpy import load_file

    from runtimes.batchfile import make_batch_file
    from tests.test_host_reliability import SMALL, expect_refusal, run_node
    from tests.test_node_host import losses_of, python_run

    bf = make_batch_file(tiny_lora, tmp_path / "batches.safetensors", steps=5, batch=2, seq=16, seed=4, lr=1e-2)
    out = tmp_path / "adapters.safetensors"
    r = run_node("--artifacts", tiny_lora, "--batches", bf, "--out", out)
    assert r.returncode == 0, r.stderr
    node_losses = losses_of(r.stdout)
    py_losses, py_params = python_run(tiny_lora, "ort", bf)
    assert len(node_losses) == 5 and max(abs(a - b) for a, b in zip(node_losses, py_losses)) <= 1e-5
    saved = load_file(str(out))
    assert sorted(saved) == sorted(py_params)  # the adapters only: the base is not the host's to write
    for n, w in py_params.items():
        np.testing.assert_allclose(saved[n], w, rtol=0, atol=1e-5 * max(1.0, float(np.abs(w).max())))
    assert any(np.any(saved[n] != w) for n, w in load_file(str(tiny_lora / "weights.safetensors")).items())

    # the training-set trainer has no frozen inputs: refused in one line, nothing written
    r = run_node("--artifacts", tiny_lora, *SMALL, "--out", tmp_path / "w.safetensors", "--training-set")
    expect_refusal(r, "format_version 4", "LoRA folder", "--runtime ort")
    assert r.stdout == "" and not (tmp_path / "w.safetensors").exists()


def test_recompute_attention_on_a_lora_folder_is_bit_identical(tiny_lora, tmp_path):
    """build --lora-rank ... --recompute-attention: the same losses and adapters, bit for bit, over 5 steps."""
    other = build_lora(tmp_path / "rc", eps=EPS, recompute_attention=True)
    a, b = runtimes.load(tiny_lora, runtime="ort"), runtimes.load(other, runtime="ort")
    assert b.art.manifest["train_step"]["recompute"] == ["attention"]
    for t, batch in enumerate(batches(a.art.config, 5, batch=2, seed=9)):
        hp = runtimes.make_hp(1e-2, *BETAS, EPS, WD, step=t + 1)
        assert a.step(*batch, hp) == b.step(*batch, hp)
    assert all(np.array_equal(w, b.parameters()[n]) for n, w in a.parameters().items())


# --- split steps, checkpoints ---------------------------------------------------------------

def test_accumulation_equals_one_step(tiny_lora):
    """grad_step.onnx + apply_step.onnx of a LoRA folder (gradients of the adapters only): 2 micro-batches
    of 2 equal one train_step on the 4 rows, over 5 steps."""
    split = runtimes.load(tiny_lora, runtime="ort")
    whole = runtimes.load(tiny_lora, runtime="ort")
    assert [o["name"] for o in split.art.model_io("grad_step.onnx")["outputs"]][1:] == [
        f"grad.{n}" for n in split.art.param_names]
    assert {i["name"] for i in split.art.model_io("apply_step.onnx")["inputs"]}.isdisjoint(split.art.frozen_shapes)
    for t, (tok, pos, lab) in enumerate(batches(split.art.config, 5, batch=4, seed=11)):
        hp = runtimes.make_hp(LR, *BETAS, EPS, WD, step=t + 1)
        a = split.step_accumulated([(tok[:2], pos[:2], lab[:2]), (tok[2:], pos[2:], lab[2:])], hp)
        b = whole.step(tok, pos, lab, hp)
        assert abs(a - b) <= 1e-6 * abs(b)
    report("accumulated vs one step, adapters after 5", {n: rel_err(split.parameters()[n], w)
                                                         for n, w in whole.parameters().items()}, 1e-5)


def test_checkpoint_holds_adapters_and_a_base_reference(tiny_lora, tmp_path):
    from runtimes.checkpoint import load_checkpoint

    rt = runtimes.load(tiny_lora, runtime="ort")
    tb = batches(rt.art.config, 4, batch=2, seed=9)
    for t, b in enumerate(tb[:2]):
        rt.step(*b, runtimes.make_hp(LR, *BETAS, EPS, WD, step=t + 1))
    rt.save(tmp_path / "c.safetensors")
    ckpt = load_checkpoint(tmp_path / "c.safetensors")
    assert set(ckpt.params) == set(rt.art.param_names) and set(ckpt.adam_m) == set(rt.art.param_names)
    assert ckpt.base == {"path": str((tiny_lora / "base.safetensors").resolve()),
                         "sha256": rt.art.manifest["frozen"]["sha256"]}
    full_bytes = sum(int(np.prod(s)) * 4 * 3 for s in rt.art.frozen_shapes.values())  # params + m + v
    assert (tmp_path / "c.safetensors").stat().st_size < 0.1 * full_bytes
    back = runtimes.resume(tmp_path / "c.safetensors", runtime="reference")
    for t, b in enumerate(tb[2:], start=2):
        hp = runtimes.make_hp(LR, *BETAS, EPS, WD, step=t + 1)
        assert abs(rt.step(*b, hp) - back.step(*b, hp)) < 1e-5
    assert all(np.array_equal(a, back.frozen()[n]) for n, a in rt.frozen().items())


def test_resume_on_another_base_is_refused(tiny_lora, tiny_index, tmp_path):
    rt = runtimes.load(tiny_lora, runtime="ort")
    rt.save(tmp_path / "c.safetensors")
    other = build_lora(tmp_path / "other", seed=43)  # same shapes, other base weights
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(runtimes.CheckpointError, match=r"trained adapters on base weights .*base.safetensors "
                                                       r"\(sha256 [0-9a-f]{16}\.\.\.\), but .*other/base.safetensors has"):
        runtimes.resume(tmp_path / "c.safetensors", artifacts=other)
    with pytest.raises(runtimes.CheckpointError, match="holds adapters of a LoRA folder, but .* is not a LoRA folder"):
        runtimes.resume(tmp_path / "c.safetensors", artifacts=tiny_index)
    full = runtimes.load(tiny_index, runtime="ort")
    full.save(tmp_path / "full.safetensors")
    with pytest.raises(runtimes.CheckpointError, match="holds a full model, but .* is a LoRA folder"):
        runtimes.resume(tmp_path / "full.safetensors", artifacts=tiny_lora)
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(before + ["full.safetensors"])  # nothing else written


def test_resume_on_a_rebuild_but_not_with_another_alpha(tiny_lora, tmp_path):
    """A rebuilt folder writes the same base.safetensors (same sha256), so a checkpoint resumes on it; the same base
    and shapes with another alpha is refused: the adapters would mean another update (the fingerprint holds it)."""
    rt = runtimes.load(tiny_lora, runtime="ort")
    rt.save(tmp_path / "c.safetensors")
    same = build_lora(tmp_path / "same", eps=EPS)
    assert runtimes.resume(tmp_path / "c.safetensors", artifacts=same).art.folder == same
    other = build_lora(tmp_path / "other", alpha=2 * ALPHA, eps=EPS)
    with pytest.raises(runtimes.CheckpointError, match="written for another model"):
        runtimes.resume(tmp_path / "c.safetensors", artifacts=other)


def test_a_runtime_without_frozen_inputs_refuses_a_lora_folder(tiny_lora, monkeypatch):
    """Every runtime here binds frozen inputs; one that did not (a backend added later) is refused at load."""
    from runtimes import base
    from runtimes.reference import ReferenceRuntime

    class Plain(ReferenceRuntime):
        name = "plain"
        frozen_inputs = False

    monkeypatch.setattr(base, "_runtime_class", lambda name: Plain)
    with pytest.raises(runtimes.RuntimeUnavailable, match="is a LoRA folder .*runtime 'plain' does not train frozen"):
        runtimes.load(tiny_lora, runtime="plain")


# --- bad build options: one line naming the value, nothing written --------------------------

@pytest.mark.parametrize("args, needle", [
    (["--lora-rank", "0"], "--lora-rank 0: the rank must be an integer >= 1"),
    (["--lora-rank", "65"], "--lora-rank 65: larger than min(in, out) = 64 of target c_attn"),
    (["--lora-rank", "70", "--lora-targets", "mlp.c_fc"], "--lora-rank 70: larger than min(in, out) = 64 of target mlp.c_fc"),
    (["--lora-rank", "4", "--lora-targets", "c_attn,q_proj"], "unknown target 'q_proj'"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha 0.0: alpha must be a finite number > 0"),
    (["--lora-rank", "4", "--lora-alpha", "-2"], "--lora-alpha -2.0"),
    (["--lora-rank", "4", "--lora-dropout", "0.1"], "--lora-dropout 0.1: only 0 is supported"),
    (["--lora-alpha", "16"], "--lora-alpha need --lora-rank"),
], ids=["rank-0", "rank-too-big", "rank-too-big-fc", "unknown-target", "alpha-0", "alpha-negative", "dropout",
        "alpha-without-rank"])
def test_bad_lora_options(args, needle, tmp_path, capsys):
    from graphgen.__main__ import main

    assert main(["build", "--config", "tiny", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_cli_builds_a_lora_folder(tmp_path, capsys):
    from graphgen.__main__ import main

    assert main(["build", "--config", "tiny", "--n-layers", "1", "--out", str(tmp_path / "a"), "--lora-rank", "2",
                 "--lora-alpha", "4", "--lora-targets", "mlp.c_fc,c_attn"]) == 0
    m = runtimes.load(tmp_path / "a", runtime="ort").art.manifest
    assert m["format_version"] == 4 and m["lora"] == {"rank": 2, "alpha": 4.0, "dropout": 0.0, "scale": 2.0,
                                                     "targets": ["c_attn", "mlp.c_fc"]}
    assert [p["name"] for p in m["parameters"]] == ["h0.c_attn.lora_A", "h0.c_attn.lora_B", "h0.mlp.c_fc.lora_A",
                                                   "h0.mlp.c_fc.lora_B"]
    assert "LoRA rank 2 on c_attn,mlp.c_fc: 1,152 trainable parameters" in capsys.readouterr().out


# --- exports: PEFT's adapter folder, the merged model for transformers and transformers.js ---------

@pytest.fixture(scope="module")
def trained_lora(tiny_lora, tmp_path_factory):
    """(runtime after 3 steps, its checkpoint, a probe batch)."""
    rt = runtimes.load(tiny_lora, runtime="ort")
    for t, b in enumerate(batches(rt.art.config, 3, batch=2, seed=9)):
        rt.step(*b, runtimes.make_hp(1e-2, *BETAS, EPS, WD, step=t + 1))  # lr 1e-2: adapters far from zero
    ckpt = tmp_path_factory.mktemp("ckpt") / "lora.safetensors"
    rt.save(ckpt)
    return rt, ckpt, batches(rt.art.config, 1, batch=2, seq=40, seed=21)[0][:2]


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_peft_loads_the_adapters_with_our_logits(trained_lora, tiny_lora, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from runtimes.export import export_hf, export_peft

    rt, ckpt, (tok, pos) = trained_lora
    export_hf(tmp_path / "base", artifacts=tiny_lora, log=lambda m: None)  # B = 0: the base model itself
    files = export_peft(tmp_path / "adapter", checkpoint=ckpt, log=lambda m: None)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    import warnings

    base = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert not [w for w in caught if "adapter keys" in str(w.message)], [str(w.message) for w in caught]
    with torch.no_grad():
        got = model(input_ids=torch.from_numpy(tok), position_ids=torch.from_numpy(pos)).logits.numpy()
    want = rt.logits(tok, pos)
    assert _rel(rt.logits(tok, pos), runtimes.load(tiny_lora, runtime="ort").logits(tok, pos)) > 1e-3  # it trained
    assert _rel(got, want) < 1e-5, _rel(got, want)


def test_hf_and_onnx_exports_are_the_merged_model(trained_lora, tmp_path):
    import onnxruntime as ort
    import torch
    from transformers import GPT2LMHeadModel

    from runtimes.export import export_hf, export_onnx
    from runtimes.sample import Decoder, load_for_sampling

    rt, ckpt, (tok, pos) = trained_lora
    want = rt.logits(tok, pos)
    export_hf(tmp_path / "hf", checkpoint=ckpt, log=lambda m: None)
    with torch.no_grad():
        got = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")(input_ids=torch.from_numpy(tok),
                                                               position_ids=torch.from_numpy(pos)).logits.numpy()
    assert _rel(got, want) < 1e-5, _rel(got, want)

    export_onnx(tmp_path / "tjs", checkpoint=ckpt, log=lambda m: None)
    sess = ort.InferenceSession(str(tmp_path / "tjs" / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": tok, "attention_mask": np.ones_like(tok), "position_ids": pos}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((tok.shape[0], rt.art.config["n_heads"], 0, 16), np.float32)
    got = sess.run(["logits"], feeds)[0]
    assert _rel(got, want) < 1e-5, _rel(got, want)

    art, weights = load_for_sampling(checkpoint=str(ckpt))  # sample's decoder: the adapters merged in
    dec = Decoder(art, weights)
    dec.reset(batch=tok.shape[0])
    assert _rel(dec(tok), want[:, -1]) < 1e-5


def test_peft_export_of_a_full_folder_is_refused(tiny_index, tmp_path):
    from runtimes.__main__ import main

    assert main(["export", "--artifacts", str(tiny_index), "--peft", str(tmp_path / "p")]) == 2
    assert not (tmp_path / "p").exists()


def test_runtimes_train_on_a_lora_folder(tiny_lora, tmp_path):
    """`runtimes train`'s loop on a LoRA folder: the header names trained/total parameters, the loss falls, the
    run's weights file and checkpoint hold the adapters, the artifact folder (base.safetensors) is untouched;
    a resume continues on the same base."""
    from contract.files import sha256_file
    from runtimes.train import TrainOptions, train

    lines = []
    base_sha = sha256_file(tiny_lora / "base.safetensors")
    opts = dict(artifacts=str(tiny_lora), runtime="ort", out=str(tmp_path / "run"), batch=4, seq=32, lr=1e-2,
                warmup=0, eval_every=10, eval_batches=2, checkpoint_every=10, sample_bytes=0, progress=False)
    s = train(TrainOptions(steps=10, **opts), echo=lines.append)
    assert "8,192 of 128,768 parameters trained" in lines[0], lines[0]
    assert s["final_val_loss"] < s["first_val_loss"] - 0.05
    from safetensors.numpy import load_file

    assert set(load_file(str(tmp_path / "run" / "weights.safetensors"))) == set(runtimes.load(
        tiny_lora, runtime="ort").art.param_names)
    train(TrainOptions(steps=14, resume=str(tmp_path / "run" / "checkpoint.safetensors"), **opts),
               echo=lines.append)
    assert runtimes.resume(tmp_path / "run" / "checkpoint.safetensors").step_count == 14
    assert sha256_file(tiny_lora / "base.safetensors") == base_sha


def test_from_hf_lora_round_trip_through_peft(tmp_path, capsys):
    """build --from-hf DIR --lora-rank: train the adapters on the imported GPT-2, export --peft, and PEFT loads them
    onto the Hugging Face folder the build started from, giving this project's logits (1e-5 relative)."""
    import warnings

    import torch
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from graphgen.__main__ import main as build_main
    from runtimes.export import export_peft
    from tests.hf_util import save_hf
    from tests.test_huggingface import SHAPE_A

    hf = save_hf(tmp_path / "hf", SHAPE_A, seed=3)  # biases and LayerNorms random too
    assert build_main(["build", "--from-hf", str(hf), "--out", str(tmp_path / "art"), "--lora-rank", "3",
                       "--lora-alpha", "6", "--lora-targets", "c_attn,mlp.c_proj"]) == 0, capsys.readouterr().err
    rt = runtimes.load(tmp_path / "art", runtime="ort")
    assert rt.art.manifest["source"]["kind"] == "huggingface"
    cfg = rt.art.config
    for t, b in enumerate(batches(cfg, 3, batch=2, seq=cfg["context"], seed=4)):
        rt.step(*b, runtimes.make_hp(1e-2, *BETAS, EPS, WD, step=t + 1))
    rt.save(tmp_path / "c.safetensors")
    export_peft(tmp_path / "peft", checkpoint=tmp_path / "c.safetensors", log=lambda m: None)
    tok = np.random.default_rng(5).integers(0, cfg["vocab"], (2, cfg["context"]))
    pos = np.tile(np.arange(cfg["context"]), (2, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(hf, dtype=torch.float32), tmp_path / "peft")
    with torch.no_grad():
        got = model.eval()(input_ids=torch.from_numpy(tok)).logits.numpy()
    assert _rel(got, rt.logits(tok, pos)) < 1e-5, _rel(got, rt.logits(tok, pos))


# --- the benchmark's machinery (structure only, no timing assertions) --------------------------

def test_bench_lora_runs_tiny_and_reports(tmp_path, capsys):
    from bench import lora as bench_lora

    out = tmp_path / "bench.json"
    assert bench_lora.main(["--config", "tiny", "--seq", "32", "--rank", "2", "--rounds", "1", "--burst", "2",
                            "--threads", "1", "--artifacts-dir", str(tmp_path / "arts"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["participants"]) == {"full", "lora", "peft"}
    for p in report["participants"].values():
        assert p["median_s"] > 0 and p["peak_rss_mib"] > 0 and len(p["losses"]) == 2
        assert all(np.isfinite(p["losses"]))
    ck = {k: report["participants"][k]["checkpoint_bytes"] for k in ("full", "lora")}
    assert 0 < ck["lora"] < ck["full"]
    assert set(report["ratios"]) == {"lora_vs_full_time", "lora_vs_full_peak_rss", "lora_vs_full_checkpoint",
                                     "lora_vs_peft_time", "lora_vs_peft_peak_rss"}
    assert "LoRA/full: time" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--rounds", "0"], ["--burst", "1"], ["--threads", "0"]])
def test_bench_lora_bad_options(args, tmp_path, capsys):
    from bench import lora as bench_lora

    assert bench_lora.main(args + ["--artifacts-dir", str(tmp_path / "never"), "--json", str(tmp_path / "n.json")]) == 2
    assert args[1] in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_data_parallel_on_a_lora_folder(tiny_lora, tmp_path):
    """2 ranks under mpiexec on a LoRA folder (each rank's grad_step binds the frozen base; adapters' gradients
    are averaged) equal one process with --accumulate 2, bit for bit; the base file is untouched."""
    from contract.files import sha256_file
    from tests.test_data_parallel import HAVE_MPI, NO_MPI, _assert_bit_identical, _mpi_train, _train

    if not HAVE_MPI:
        pytest.skip(NO_MPI)
    base_sha = sha256_file(tiny_lora / "base.safetensors")
    _train(tiny_lora, tmp_path / "acc2", "--accumulate", "2")
    p = _mpi_train(2, tiny_lora, tmp_path / "dp2")
    assert "of 128,768 parameters trained" in p.stdout + p.stderr
    _assert_bit_identical(tmp_path / "acc2", tmp_path / "dp2")
    assert sha256_file(tiny_lora / "base.safetensors") == base_sha
