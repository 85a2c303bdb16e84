"""Cross-runtime parity: every runtime on the same artifacts and batches, against the torch oracle.

Runtimes: ort-training (ONNX Runtime's gradient builder + fused AdamW kernel on
the training set), ort (our autodiff + AdamW in train_step.onnx on onnxruntime
1.19 here, and on a current onnxruntime release in .venv-ort), reference
(onnx.reference.ReferenceEvaluator on train_step.onnx), openvino (OpenVINO's
CPU plugin on train_step.onnx, in .venv: the test extra installs it). The two backward
derivations are independent; the oracle (tests/oracle, PyTorch autograd and
torch.optim.AdamW) is independent of both.

Tolerances (float32), each error printed per tensor (pytest -s, or on failure):
  loss and logits at init ........ 1e-5 absolute
  gradients at step 1 ............ 1e-5 relative per tensor
  losses over 20 AdamW steps ..... 1e-4 absolute
  parameters and moments after 20  1e-4 relative per tensor
(b_k's exact gradient is zero; see parity_util for how it is held.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtimes
from tests.oracle.torch_gpt2 import TorchGPT2
from tests.parity_util import F32, batches, compare_state, floored_errors, report

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ["ort-training", "ort", "reference", "openvino"]
MODES = ["index", "dense"]
STEPS, LR, BETAS, EPS, WD = 20, 1e-3, (0.9, 0.999), 1e-8, 0.01
ORT_CURRENT_PY = ROOT / ".venv-ort" / "bin" / "python"

_cache: dict = {}


def _folder(mode, tiny_index, tiny_dense):
    return tiny_index if mode == "index" else tiny_dense


def _data(cfg):
    init_batch = batches(cfg, 1, batch=3, seq=cfg["context"], seed=7)[0]
    short_batch = batches(cfg, 1, batch=2, seq=19, seed=8)[0]
    return init_batch, short_batch, batches(cfg, STEPS, batch=2, seed=9)


def run_oracle(folder: Path) -> dict:
    art = runtimes.load(folder, runtime="reference", verify=False).art
    init_batch, short_batch, train_batches = _data(art.config)
    o = TorchGPT2(art.config, art.initial_weights())
    loss0, grads = o.grads(*init_batch)
    res = {
        "logits": o.logits(*init_batch[:2]), "loss": loss0, "grads": grads,
        "short_logits": o.logits(*short_batch[:2]), "short_loss": o.loss(*short_batch),
    }
    res["losses"] = o.train(train_batches, lr=F32(LR), betas=(F32(BETAS[0]), F32(BETAS[1])), eps=F32(EPS), weight_decay=F32(WD))
    res["params"] = o.parameters()
    res["m"], res["v"] = o.moments()
    return res


def run_runtime(rt) -> dict:
    init_batch, short_batch, train_batches = _data(rt.art.config)
    res = {
        "logits": rt.logits(*init_batch[:2]), "loss": rt.loss(*init_batch), "grads": rt.gradients(*init_batch),
        "short_logits": rt.logits(*short_batch[:2]), "short_loss": rt.loss(*short_batch),
    }
    res["losses"] = [rt.step(*b, runtimes.make_hp(LR, *BETAS, EPS, WD, step=t + 1)) for t, b in enumerate(train_batches)]
    res["params"] = rt.parameters()
    res["m"], res["v"] = rt.moments()
    return res


def results(key, folder, make):
    if key not in _cache:
        _cache[key] = make(folder)
    return _cache[key]


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


@pytest.fixture
def oracle(mode, tiny_index, tiny_dense):
    return results(("oracle", mode), _folder(mode, tiny_index, tiny_dense), run_oracle)


@pytest.fixture(params=RUNTIMES)
def ours(request, mode, tiny_index, tiny_dense):
    name = request.param
    res = results((name, mode), _folder(mode, tiny_index, tiny_dense),
                  lambda f: run_runtime(runtimes.load(f, runtime=name)))
    return name, res


def test_init_logits_and_loss(ours, oracle, mode):
    name, r = ours
    errs = {
        "logits (B=3, T=context)": float(np.abs(r["logits"] - oracle["logits"]).max()),
        "loss (B=3, T=context)": abs(r["loss"] - oracle["loss"]),
        "logits (B=2, T=19)": float(np.abs(r["short_logits"] - oracle["short_logits"]).max()),
        "loss (B=2, T=19)": abs(r["short_loss"] - oracle["short_loss"]),
    }
    report(f"{name} vs torch at init, {mode} labels (absolute)", errs, 1e-5)


def test_step1_gradients(ours, oracle, mode):
    name, r = ours
    report(f"{name} gradients vs torch, {mode} labels", floored_errors(r["grads"], oracle["grads"]), 1e-5)


def test_20_step_losses(ours, oracle, mode):
    name, r = ours
    diff = np.abs(np.array(r["losses"]) - np.array(oracle["losses"]))
    report(f"{name} 20-step AdamW losses vs torch, {mode} labels (absolute)",
           {f"step {i + 1}": float(d) for i, d in enumerate(diff)}, 1e-4)
    assert r["losses"][-1] < r["losses"][0] - 0.2  # it learns


def test_20_step_parameters_and_moments(ours, oracle, mode):
    name, r = ours
    compare_state(f"{name} parameters after 20 steps, {mode} labels", r["params"], oracle["params"], 1e-4, LR, STEPS)
    report(f"{name} first moments after 20 steps, {mode} labels", floored_errors(r["m"], oracle["m"]), 1e-4)
    report(f"{name} second moments after 20 steps, {mode} labels", floored_errors(r["v"], oracle["v"]), 1e-4)


# --- the portable step on a current onnxruntime release -------------------------

CURRENT_ORT_SCRIPT = r"""
import json, sys
import numpy as np
import onnxruntime, runtimes
from tests.parity_util import batches
folder, out = sys.argv[1], sys.argv[2]
rt = runtimes.load(folder, runtime="ort")
tb = batches(rt.art.config, 20, batch=2, seed=9)
losses = [rt.step(*b, runtimes.make_hp(1e-3, 0.9, 0.999, 1e-8, 0.01, step=t + 1)) for t, b in enumerate(tb)]
np.savez(out, losses=np.array(losses), **{"p." + k: v for k, v in rt.parameters().items()})
print(json.dumps({"onnxruntime": onnxruntime.__version__}))
"""


@pytest.mark.parametrize("mode_", MODES)
def test_ort_runtime_on_current_onnxruntime(mode_, tiny_index, tiny_dense, tmp_path):
    """train_step.onnx through the `ort` runtime on onnxruntime >= 1.20 (the
    .venv-ort environment `make test` creates: pip install '.[ort]'), where no
    training kernels exist, against the oracle."""
    assert ORT_CURRENT_PY.exists(), (
        f"{ORT_CURRENT_PY} is missing: `make test` creates it (pip install -e '.[ort]' in .venv-ort)"
    )
    folder = _folder(mode_, tiny_index, tiny_dense)
    out = tmp_path / "current.npz"
    proc = subprocess.run([str(ORT_CURRENT_PY), "-c", CURRENT_ORT_SCRIPT, str(folder), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = json.loads(proc.stdout.strip().splitlines()[-1])["onnxruntime"]
    assert tuple(int(x) for x in version.split(".")[:2]) >= (1, 20), version
    got = np.load(out)
    oracle = results(("oracle", mode_), folder, run_oracle)
    diff = np.abs(got["losses"] - np.array(oracle["losses"]))
    report(f"ort on onnxruntime {version}: 20-step losses vs torch, {mode_} labels (absolute)",
           {f"step {i + 1}": float(d) for i, d in enumerate(diff)}, 1e-4)
    params = {k[2:]: got[k] for k in got.files if k.startswith("p.")}
    compare_state(f"ort on onnxruntime {version}: parameters after 20 steps, {mode_}", params, oracle["params"],
                  1e-4, LR, STEPS)


# --- global-norm gradient clipping ---------------------------------------------------

CLIP = 1.8  # below the gradient norm on most of these 20 steps (1.6-3.2 unclipped)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """tiny with the ONNX Runtime training set built to clip at CLIP (its threshold is fixed at build)."""
    from graphgen.artifacts import build_artifacts
    from graphgen.config import GPT2Config

    out = tmp_path_factory.mktemp("artifacts") / "tiny-clip"
    build_artifacts(GPT2Config.preset("tiny", clip=CLIP), out, log=lambda m: None)
    return out


def _clipped_run(step, cfg) -> list[float]:
    tb = batches(cfg, STEPS, batch=2, seed=9)
    return [step(b, runtimes.make_hp(LR, *BETAS, EPS, WD, step=t + 1)) for t, b in enumerate(tb)]


@pytest.fixture(scope="module")
def clipped_oracle(tiny_clip):
    art = runtimes.load(tiny_clip, runtime="reference", verify=False).art
    o = TorchGPT2(art.config, art.initial_weights())
    losses = _clipped_run(lambda b, hp: o.train([b], lr=F32(LR), betas=(F32(BETAS[0]), F32(BETAS[1])), eps=F32(EPS),
                                                 weight_decay=F32(WD), clip=CLIP)[0], art.config)
    m, v = o.moments()
    return {"losses": losses, "norms": o.grad_norms, "params": o.parameters(), "m": m, "v": v}


@pytest.mark.parametrize("name", RUNTIMES)
def test_20_clipped_steps_match_clip_grad_norm_then_adamw(name, tiny_clip, clipped_oracle):
    """torch.nn.utils.clip_grad_norm_ then torch.optim.AdamW, clipping on most steps: losses,
    gradient norms, parameters and moments to 1e-4 on every runtime (ort-training with its
    threshold built in, and no norm to report)."""
    o = clipped_oracle
    assert sum(n > CLIP for n in o["norms"]) >= 12, o["norms"]  # clipping is what is being tested
    rt = runtimes.load(tiny_clip, runtime=name)
    norms = []

    def step(b, hp):
        loss = rt.step(*b, hp, CLIP)
        norms.append(rt.last_grad_norm)
        return loss

    losses = _clipped_run(step, rt.art.config)
    diff = np.abs(np.array(losses) - np.array(o["losses"]))
    report(f"{name} 20 clipped steps: losses vs torch (absolute)", {f"step {i + 1}": float(d) for i, d in enumerate(diff)},
           1e-4)
    if name == "ort-training":
        assert norms == [None] * STEPS
    else:
        report(f"{name} 20 clipped steps: gradient norms vs torch (relative)",
               {f"step {i + 1}": abs(a - b) / b for i, (a, b) in enumerate(zip(norms, o["norms"]))}, 1e-4)
    compare_state(f"{name} parameters after 20 clipped steps", rt.parameters(), o["params"], 1e-4, LR, STEPS)
    m, v = rt.moments()
    report(f"{name} first moments after 20 clipped steps", floored_errors(m, o["m"]), 1e-4)
    report(f"{name} second moments after 20 clipped steps", floored_errors(v, o["v"]), 1e-4)


def test_ort_training_refuses_another_clip_than_built(tiny_clip, tiny_index):
    tb = batches(runtimes.load(tiny_index, runtime="reference", verify=False).art.config, 1, batch=2, seed=9)[0]
    hp = runtimes.make_hp(LR, *BETAS, EPS, WD, step=1)
    for folder, clip in ((tiny_clip, 0.0), (tiny_clip, 2 * CLIP), (tiny_index, CLIP)):
        rt = runtimes.load(folder, runtime="ort-training")
        with pytest.raises(runtimes.InputError, match="built with clip"):
            rt.step(*tb, hp, clip)
        assert rt.step_count == 0
    rt = runtimes.load(tiny_index, runtime="ort-training")
    rt.step(*tb, hp, float("inf"))  # inf is off, as 0 is: what tiny_index was built with


# --- a realistic size on two threads ----------------------------------------------

@pytest.fixture(scope="module")
def small_index(tmp_path_factory) -> Path:
    from graphgen.artifacts import build_artifacts
    from graphgen.config import GPT2Config

    out = tmp_path_factory.mktemp("artifacts") / "small"
    build_artifacts(GPT2Config.preset("small"), out, log=lambda m: None)
    return out


@pytest.mark.parametrize("name", ["ort", "ort-training"])
def test_gradients_on_small_with_two_threads(name, small_index):
    """tiny is too small for onnxruntime to split kernels across threads, so races in a
    multithreaded kernel never show there (the ScatterND one did not: tests/test_autodiff_rules.py).
    The small preset (d_model 256, 4 layers) at 16x64 tokens (make train's batch; ScatterND
    raced from about 1,024 rows of 256 floats), 2 intra-op threads, against the oracle."""
    rt = runtimes.load(small_index, runtime=name, threads=2, verify=False)
    tok, pos, lab = batches(rt.art.config, 1, batch=16, seq=64, seed=3)[0]
    assert len(np.unique(tok)) < tok.size / 4  # text: every row of wte's gradient sums many tokens
    loss, want = TorchGPT2(rt.art.config, rt.art.initial_weights()).grads(tok, pos, lab)
    assert abs(rt.loss(tok, pos, lab) - loss) < 1e-5
    report(f"{name} gradients vs torch on small 16x64, 2 threads", floored_errors(rt.gradients(tok, pos, lab), want),
           1e-4)


# --- CUDA ----------------------------------------------------------------------

def _has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


# Gradients on the GPU match the oracle to 1e-6 (float32; TF32 is off), but AdamW divides
# by sqrt(v): an element whose gradient is near zero moves by up to lr a step whatever its
# sign, so a last-bit difference there (the GPU sums in another order) becomes a
# whole-step difference. Measured on an H200: 1.9e-3 after 20 steps of tiny, 7e-4 after
# 6 of small; the CPU runtimes agree to 1e-4 because they sum in the oracle's order.
CUDA_PARAM_TOL = 5e-3


def _has_ort_training() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime.training") is not None


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="no CUDAExecutionProvider in this onnxruntime")
@pytest.mark.parametrize("name", ["ort", "ort-training"])
def test_cuda_matches_oracle(name, tiny_index):
    if name == "ort-training" and not _has_ort_training():
        pytest.skip("this onnxruntime is not a training build (onnxruntime-training's CUDA wheel)")
    rt = runtimes.load(tiny_index, runtime=name, device="cuda")
    r = run_runtime(rt)
    oracle = results(("oracle", "index"), tiny_index, run_oracle)
    report(f"{name}/cuda gradients vs torch", floored_errors(r["grads"], oracle["grads"]), 1e-5)
    diff = np.abs(np.array(r["losses"]) - np.array(oracle["losses"]))
    assert diff.max() <= 1e-4
    compare_state(f"{name}/cuda parameters after 20 steps", r["params"], oracle["params"], CUDA_PARAM_TOL, LR, STEPS)


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="no CUDAExecutionProvider in this onnxruntime")
def test_cuda_on_small_matches_the_oracle_and_the_cpu(small_index):
    """Realistic size on the GPU: gradients against the oracle, then three steps of the
    single graph and three accumulated steps (grad_step on the device, the mean on the
    host, apply_step on the device) against the same steps on the CPU."""
    gpu = runtimes.load(small_index, runtime="ort", device="cuda", verify=False)
    tok, pos, lab = batches(gpu.art.config, 1, batch=16, seq=64, seed=3)[0]
    loss, want = TorchGPT2(gpu.art.config, gpu.art.initial_weights()).grads(tok, pos, lab)
    assert abs(gpu.loss(tok, pos, lab) - loss) < 1e-4
    report("ort/cuda gradients vs torch on small 16x64", floored_errors(gpu.gradients(tok, pos, lab), want), 1e-4)

    cpu = runtimes.load(small_index, runtime="ort", threads=2, verify=False)
    tb = batches(gpu.art.config, 6, batch=8, seq=64, seed=4)
    for rt in (gpu, cpu):
        rt.losses = [rt.step(*b, runtimes.make_hp(LR, *BETAS, EPS, WD, step=t + 1), 1.0)
                     for t, b in enumerate(tb[:3])]
        rt.losses += [rt.step_accumulated(tb[3 + t: 4 + t] * 2, runtimes.make_hp(LR, *BETAS, EPS, WD, step=4 + t), 1.0)
                      for t in range(3)]
    np.testing.assert_allclose(gpu.losses, cpu.losses, rtol=1e-5)
    compare_state("ort/cuda parameters after 6 steps vs ort/cpu", gpu.parameters(), cpu.parameters(),
                  CUDA_PARAM_TOL, LR, 6)


def test_cuda_request_without_cuda_is_a_clear_error(tiny_index):
    if _has_cuda():
        pytest.skip("this machine has CUDA; the error path cannot occur")
    for name in ("ort", "ort-training"):
        with pytest.raises(runtimes.RuntimeUnavailable, match="CUDAExecutionProvider"):
            runtimes.load(tiny_index, runtime=name, device="cuda")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s"]))
