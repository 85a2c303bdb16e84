"""Run an artifact folder's forward.onnx and train_step.onnx, as shipped, on one ONNX engine.

    python tests/engines/run_engine.py ENGINE ARTIFACTS FEEDS OUT [--time N] [--threads K]
    python tests/engines/run_engine.py ENGINE MODEL.onnx FEEDS OUT

ENGINE: openvino, tract, tvm, onnx2torch, tinygrad, or onnxruntime (the baseline).
FEEDS (.npz, written by tests/test_engine_conformance.py): ``fwd.tokens``/``fwd.positions``
for the forward, and ``tokens``/``positions``/``labels`` stacked (steps, B, T[, vocab]), ``hp``
(steps, 7) and ``clip`` (a scalar) for the steps. The driver reads the initial weights and the
parameter order from the folder (weights.safetensors, manifest.json), starts from zero moments
and chains the steps, feeding every ``new.*`` output back. It writes OUT (.npz): ``logits``,
``losses``, ``grad_norms``, and the final ``p.<name>``, ``m.<name>``, ``v.<name>``. With
``--time N`` it then times N more chained steps. Its last stdout line is JSON: engine, version,
seconds to load/compile each model and to run the first step, and the median step time in ms
(with --time).
Given a single MODEL.onnx instead of a folder, it runs that model once on every array in FEEDS
and writes its outputs to OUT (the engine-bug repros of the conformance test).

Standalone on purpose: it runs in .venv-engines (numpy, onnx, safetensors and the engines; no
project package), with plain host arrays in and out for every engine (no engine's device-side
state or IO binding): what an embedder gets from each engine's ordinary Python API.
Static-shape engines (tvm) compile each model for the shapes of FEEDS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np

ENGINES = ("openvino", "tract", "tvm", "onnx2torch", "tinygrad", "onnxruntime")


def _c(a) -> np.ndarray:
    """A C-contiguous array; 0-d stays 0-d (np.ascontiguousarray would make it 1-d)."""
    return np.asarray(a, order="C")


def _io_names(path: str) -> tuple[list[str], list[str]]:
    import onnx

    m = onnx.load(path, load_external_data=False)
    return [i.name for i in m.graph.input], [o.name for o in m.graph.output]


def make_openvino(path, example, threads):
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32"}  # else bf16 matmuls on CPUs that have them
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", config)
    req = compiled.create_infer_request()
    names = [o.get_any_name() for o in compiled.outputs]

    def run(feeds):
        req.infer({k: _c(v) for k, v in feeds.items()})
        return {n: req.get_tensor(n).data.copy() for n in names}

    return run, ov.__version__.split("-")[0]


def make_tract(path, example, threads):
    import tract

    inputs, outputs = _io_names(path)
    runnable = tract.onnx().load(path).into_model().into_runnable()  # symbolic B and T, as declared

    def run(feeds):
        res = runnable.run([_c(feeds[n]) for n in inputs])
        return {n: v.to_numpy() for n, v in zip(outputs, res)}

    return run, tract.version()


def make_tvm(path, example, threads):
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)  # read when TVM's thread pool starts
    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    model = onnx.load(path)
    inputs, outputs = _io_names(path)
    mod = from_onnx(model, shape_dict={n: list(example[n].shape) for n in inputs}, keep_params_in_input=False)
    mod = relax.transform.DecomposeOpsForInference()(mod)
    mod = relax.transform.LegalizeOps()(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    to_dev = tvm.runtime.tensor if hasattr(tvm.runtime, "tensor") else tvm.nd.array

    def run(feeds):
        res = vm["main"](*[to_dev(_c(feeds[n])) for n in inputs])
        res = [res] if hasattr(res, "numpy") else list(res)
        return {n: v.numpy() for n, v in zip(outputs, res)}

    return run, tvm.__version__


def make_onnx2torch(path, example, threads):
    import onnx
    import torch

    try:
        import torchvision  # noqa: F401  (onnx2torch imports it for its NMS/RoIAlign converters only)
    except Exception:  # not installed, or a CUDA build next to CPU torch: those two converters are unused here
        def missing(name):
            if name.startswith("_"):
                raise AttributeError(name)

            def op(*args, **kwargs):
                raise NotImplementedError(f"torchvision.ops.{name}: torchvision is not usable here")
            return op

        stub = types.ModuleType("torchvision")
        stub.ops = types.ModuleType("torchvision.ops")
        stub.ops.__getattr__ = missing  # PEP 562: `from torchvision.ops import nms` gets a stand-in
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, stub.ops
    from importlib import metadata

    from onnx2torch import convert

    if threads:
        torch.set_num_threads(threads)
    inputs, outputs = _io_names(path)
    module = convert(onnx.load(path))

    def run(feeds):
        with torch.no_grad():
            res = module(*[torch.from_numpy(_c(feeds[n])) for n in inputs])
        res = res if isinstance(res, (tuple, list)) else [res]
        return {n: v.numpy() for n, v in zip(outputs, res)}

    return run, metadata.version("onnx2torch")


def make_tinygrad(path, example, threads):
    if threads:
        os.environ["NUM_CPU_THREADS"] = str(threads)  # read at import
    from importlib import metadata

    from tinygrad import Tensor
    from tinygrad.nn.onnx import OnnxRunner

    runner = OnnxRunner(path)

    def run(feeds):
        res = runner({k: Tensor(_c(v)) for k, v in feeds.items()})
        Tensor.realize(*res.values())  # one schedule for all outputs (one by one re-walks the shared graph)
        return {k: v.numpy() for k, v in res.items()}

    return run, metadata.version("tinygrad")


def make_onnxruntime(path, example, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in sess.get_outputs()]

    def run(feeds):
        return dict(zip(outputs, sess.run(None, feeds)))

    return run, ort.__version__


def load_weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    manifest = json.loads((folder / "manifest.json").read_text())
    weights = load_file(str(folder / "weights.safetensors"))
    return {p["name"]: weights[p["name"]] for p in manifest["parameters"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engine", choices=ENGINES)
    p.add_argument("artifacts", type=Path)
    p.add_argument("feeds", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--time", type=int, default=0, metavar="N", help="time N more chained steps")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)

    make = globals()["make_" + a.engine]
    data = np.load(a.feeds)
    if a.artifacts.suffix == ".onnx":  # one model, one run: every array in FEEDS is an input
        feeds = {k: data[k] for k in data.files}
        run, version = make(str(a.artifacts), feeds, a.threads)
        np.savez(a.out, **{k: np.asarray(v) for k, v in run(feeds).items()})
        print(json.dumps({"engine": a.engine, "version": version, "model": a.artifacts.name}))
        return 0
    weights = load_weights(a.artifacts)
    names = list(weights)
    steps = data["tokens"].shape[0]
    report = {"engine": a.engine, "steps": steps}

    def step_feeds(t):
        return {"tokens": data["tokens"][t], "positions": data["positions"][t], "labels": data["labels"][t],
                "hp": data["hp"][t], "clip": np.asarray(data["clip"], np.float32)}

    t0 = time.perf_counter()
    fwd_feeds = {"tokens": data["fwd.tokens"], "positions": data["fwd.positions"], **weights}
    forward, report["version"] = make(str(a.artifacts / "forward.onnx"), fwd_feeds, a.threads)
    report["forward_load_s"] = time.perf_counter() - t0
    logits = forward(fwd_feeds)["logits"]

    state = {**weights, **{"m." + n: np.zeros_like(w) for n, w in weights.items()},
             **{"v." + n: np.zeros_like(w) for n, w in weights.items()}}
    t0 = time.perf_counter()
    train_step, _ = make(str(a.artifacts / "train_step.onnx"), {**state, **step_feeds(0)}, a.threads)
    report["train_step_load_s"] = time.perf_counter() - t0
    losses, norms, times = [], [], []
    for t in range(steps + a.time):
        t0 = time.perf_counter()
        out = train_step({**state, **step_feeds(t % steps)})
        if t == 0:
            report["first_step_s"] = time.perf_counter() - t0  # lazy engines (tinygrad) compile here
        if t >= steps:
            times.append((time.perf_counter() - t0) * 1e3)
        else:
            losses.append(float(np.asarray(out["loss"])))
            norms.append(float(np.asarray(out["grad_norm"])))
        state = {k: np.asarray(out["new." + k], np.float32) for k in state}
        if t == steps - 1:
            np.savez(a.out, logits=np.asarray(logits), losses=np.array(losses), grad_norms=np.array(norms),
                     **{"p." + n: state[n] for n in names}, **{"m." + n: state["m." + n] for n in names},
                     **{"v." + n: state["v." + n] for n in names})
    if times:
        report["step_ms"] = statistics.median(times)
        report["step_ms_all"] = [round(x, 3) for x in times]
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
