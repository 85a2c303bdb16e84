"""build_train_step on a small hand-made forward (embedding + LayerNorm + MatMul + tied
unembedding + LogSoftmax/GatherElements or dense-label loss)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh
from onnx.reference import ReferenceEvaluator

from tests.reference_ops import GatherElements  # the test graphs use axis=-1
from graphgen.adamw import HP_FIELDS, adamw_reference, clip_coefficient
from runtimes.hp import make_hp
from graphgen.autodiff import AutodiffError
from graphgen.train_step import build_grad_model, build_train_step

V, C, D = 11, 6, 8
B, T = 2, 5
PARAMS = [("wte", (V, D)), ("wpe", (C, D)), ("h0.ln_g", (D,)), ("h0.ln_b", (D,)), ("h0.w", (D, D)),
          ("h0.b", (D,)), ("lnf_g", (D,)), ("lnf_b", (D,))]
NAMES = [p for p, _ in PARAMS]
MODES = ("index", "dense")


def tiny_forward(labels: str) -> onnx.ModelProto:
    """x = wte[tok] + wpe[pos]; a = LN(x); z = a + 0.5*tanh(a W^T + b); loss(LN(z) wte^T)."""
    n = h.make_node
    nodes = [
        n("Gather", ["wte", "tokens"], ["te"], name="emb_t"),
        n("Gather", ["wpe", "positions"], ["pe"], name="emb_p"),
        n("Add", ["te", "pe"], ["x"], name="add_x"),
        n("LayerNormalization", ["x", "h0.ln_g", "h0.ln_b"], ["a", "a_mean", "a_rstd"], name="ln1", axis=-1,
          epsilon=1e-5),
        n("Transpose", ["h0.w"], ["wT"], name="wT", perm=[1, 0]),
        n("MatMul", ["a", "wT"], ["y0"], name="mm"),
        n("Add", ["y0", "h0.b"], ["y"], name="addb"),
        n("Tanh", ["y"], ["ty"], name="tanh"),
        n("Constant", [], ["half"], name="half", value=nh.from_array(np.array(0.5, np.float32))),
        n("Mul", ["ty", "half"], ["ty2"], name="mulhalf"),
        n("Add", ["ty2", "a"], ["z"], name="res"),
        n("LayerNormalization", ["z", "lnf_g", "lnf_b"], ["zf", "zf_m", "zf_r"], name="lnf", axis=-1, epsilon=1e-5),
        n("Transpose", ["wte"], ["wteT"], name="wteT", perm=[1, 0]),
        n("MatMul", ["zf", "wteT"], ["logits"], name="logits"),
        n("LogSoftmax", ["logits"], ["logp"], name="lsm", axis=-1),
    ]
    inits = [nh.from_array(np.array([-1], np.int64), "ax_m1")]
    if labels == "index":
        nodes += [n("Unsqueeze", ["labels", "ax_m1"], ["lab_u"], name="lab_u"),
                  n("GatherElements", ["logp", "lab_u"], ["picked"], name="pick", axis=-1)]
        lab = h.make_tensor_value_info("labels", TP.INT64, ["batch", "seq"])
    else:
        nodes += [n("Mul", ["labels", "logp"], ["lp"], name="lp"),
                  n("ReduceSum", ["lp", "ax_m1"], ["picked"], name="rowsum", keepdims=0)]
        lab = h.make_tensor_value_info("labels", TP.FLOAT, ["batch", "seq", V])
    nodes += [n("ReduceMean", ["picked"], ["mean_lp"], name="mean", keepdims=0),
              n("Neg", ["mean_lp"], ["loss"], name="neg")]
    inputs = [h.make_tensor_value_info("tokens", TP.INT64, ["batch", "seq"]),
              h.make_tensor_value_info("positions", TP.INT64, ["batch", "seq"]), lab]
    inputs += [h.make_tensor_value_info(p, TP.FLOAT, list(s)) for p, s in PARAMS]
    g = h.make_graph(nodes, "tiny", inputs, [h.make_tensor_value_info("loss", TP.FLOAT, [])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 10
    return m


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph in float64 (inputs, initializers, Constant tensors)."""
    m = copy.deepcopy(model)
    g = m.graph
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type == TP.FLOAT:
            vi.type.tensor_type.elem_type = TP.DOUBLE
    del g.value_info[:]
    for t in g.initializer:
        if t.data_type == TP.FLOAT:
            t.CopyFrom(nh.from_array(nh.to_array(t).astype(np.float64), t.name))
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TP.FLOAT:
                a.t.CopyFrom(nh.from_array(nh.to_array(a.t).astype(np.float64), a.t.name))
            if node.op_type == "Cast" and a.name == "to" and a.i == TP.FLOAT:
                a.i = TP.DOUBLE
    return m


def session(model, optimize=True):
    so = ort.SessionOptions()
    if not optimize:  # ORT's fused kernels are float32-only
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def data_feeds(mode, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, T))
    tokens[0, :3] = 4  # repeated token: its embedding row gets summed contributions
    f = {"tokens": tokens, "positions": np.tile(np.arange(T), (B, 1))}
    f["labels"] = (rng.integers(0, V, (B, T)) if mode == "index"
                   else rng.dirichlet(np.ones(V), (B, T)).astype(np.float32))
    return f


def param_feeds(seed=0):
    rng = np.random.default_rng(seed + 100)
    p = {n: (rng.standard_normal(s) * 0.3).astype(np.float32) for n, s in PARAMS}
    for n in ("h0.ln_g", "lnf_g"):
        p[n] = (1.0 + p[n]).astype(np.float32)
    return p


def state_feeds(seed=0):
    rng = np.random.default_rng(seed + 200)
    m = {f"m.{n}": (rng.standard_normal(s) * 0.01).astype(np.float32) for n, s in PARAMS}
    v = {f"v.{n}": (rng.random(s) * 1e-4).astype(np.float32) for n, s in PARAMS}
    return {**m, **v}


@pytest.fixture(scope="module", params=MODES)
def built(request):
    mode = request.param
    fwd = tiny_forward(mode)
    ts = build_train_step(fwd, NAMES)
    gm = build_grad_model(fwd, NAMES)
    return dict(mode=mode, fwd=fwd, ts=ts, gm=gm, ts_sess=session(ts), gm_sess=session(gm), fwd_sess=session(fwd),
                ts_ref=ReferenceEvaluator(ts, new_ops=[GatherElements]))


def step_feeds(mode, hp, seed=0, clip=0.0):
    return {**param_feeds(seed), **state_feeds(seed), **data_feeds(mode, seed), "hp": np.asarray(hp, np.float32),
            "clip": np.array(clip, np.float32)}


def run_step(b, feeds, runtime="ort"):
    ts = b["ts"]
    outs = (b["ts_sess"].run(None, feeds) if runtime == "ort" else b["ts_ref"].run(None, feeds))
    return dict(zip([o.name for o in ts.graph.output], outs))


def numpy_step(b, feeds):
    """AdamW in NumPy applied to the gradients of the (separately built) gradient model."""
    gm = b["gm_sess"].run(None, {k: v for k, v in feeds.items() if not k.startswith(("m.", "v.", "hp", "clip"))})
    grads = dict(zip(NAMES, gm[1:]))
    norm, coef = clip_coefficient(grads.values(), float(feeds["clip"]))
    out = {"loss": gm[0], "grad_norm": np.float32(norm)}
    for n in NAMES:
        w, m, v = adamw_reference(feeds[n], grads[n], feeds[f"m.{n}"], feeds[f"v.{n}"], feeds["hp"], coef)
        out[f"new.{n}"], out[f"new.m.{n}"], out[f"new.v.{n}"] = w, m, v
    return out, grads


def literal_formula(w, g, m, v, hp):
    """The update exactly as docs/semantics.md writes it, in float64."""
    lr, b1, b2, eps, wd, b1h, b2h = (float(x) for x in hp)
    w, g, m, v = (np.asarray(a, np.float64) for a in (w, g, m, v))
    m2 = b1 * m + (1 - b1) * g
    v2 = b2 * v + (1 - b2) * g * g
    return w * (1 - lr * wd) - lr * (m2 * b1h) / (np.sqrt(v2 * b2h) + eps), m2, v2


# --------------------------------------------------------------------------- structure


def test_io_names_and_order(built):
    ts = built["ts"]
    ins = [i.name for i in ts.graph.input]
    assert ins == NAMES + [f"m.{n}" for n in NAMES] + [f"v.{n}" for n in NAMES] + \
        ["tokens", "positions", "labels", "hp", "clip"]
    outs = [o.name for o in ts.graph.output]
    assert outs == ["loss", "grad_norm"] + [f"new.{n}" for n in NAMES] + [f"new.m.{n}" for n in NAMES] + \
        [f"new.v.{n}" for n in NAMES]
    hp = ts.graph.input[ins.index("hp")].type.tensor_type
    assert hp.elem_type == TP.FLOAT and [d.dim_value for d in hp.shape.dim] == [7]
    clip = ts.graph.input[ins.index("clip")].type.tensor_type
    assert clip.elem_type == TP.FLOAT and list(clip.shape.dim) == []
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in ts.graph.input}
    for n, s in PARAMS:
        assert shapes[n] == shapes[f"m.{n}"] == shapes[f"v.{n}"] == list(s)
    assert [o.name for o in built["gm"].graph.output] == ["loss"] + [f"grad.{n}" for n in NAMES]


def test_checker_strict_inference_default_domain_ir10(built):
    for model in (built["ts"], built["gm"]):
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
        assert model.ir_version == 10
        types = {v.name: v.type.tensor_type for v in inferred.graph.output}
        assert list(types["loss"].shape.dim) == []


def test_bad_forward_is_rejected():
    fwd = tiny_forward("index")
    with pytest.raises(AutodiffError, match="lacks inputs"):
        build_train_step(fwd, NAMES + ["nope"])
    with pytest.raises(AutodiffError, match="neither data nor parameters"):
        build_train_step(fwd, NAMES[:-1])


# --------------------------------------------------------------------------- numerics


def test_gradients_match_finite_differences(built):
    """The float64 copy of the forward, differentiated, matches central differences everywhere."""
    f64 = to_float64(built["fwd"])
    gm = build_grad_model(f64, NAMES)
    gs, fs = session(gm, optimize=False), session(f64, optimize=False)
    feeds = {**{k: v.astype(np.float64) for k, v in param_feeds().items()}, **data_feeds(built["mode"])}
    if built["mode"] == "dense":
        feeds["labels"] = feeds["labels"].astype(np.float64)
    grads = dict(zip(NAMES, gs.run(None, feeds)[1:]))
    eps = 1e-6
    for n, shape in PARAMS:
        fd = np.zeros(shape)
        for j in range(fd.size):
            w = feeds[n].copy()
            w.flat[j] += eps
            lp = fs.run(None, {**feeds, n: w})[0]
            w.flat[j] -= 2 * eps
            lm = fs.run(None, {**feeds, n: w})[0]
            fd.flat[j] = (lp - lm) / (2 * eps)
        np.testing.assert_allclose(grads[n], fd, rtol=1e-6, atol=1e-9, err_msg=n)
    # float32 gradients (saved LayerNorm statistics, ORT's fused kernels) agree with float64
    g32 = built["gm_sess"].run(None, {**param_feeds(), **data_feeds(built["mode"])})[1:]
    for n, g in zip(NAMES, g32):
        np.testing.assert_allclose(g, grads[n], rtol=1e-3, atol=2e-6, err_msg=n)


@pytest.mark.parametrize("runtime", ["ort", "reference"])
def test_step_matches_numpy_adamw(built, runtime):
    hp = make_hp(2e-3, 0.85, 0.99, 1e-6, 0.05, step=3)
    feeds = step_feeds(built["mode"], hp)
    got = run_step(built, feeds, runtime)
    want, grads = numpy_step(built, feeds)
    fwd_loss = built["fwd_sess"].run(None, {k: v for k, v in feeds.items() if k in
                                            {"tokens", "positions", "labels", *NAMES}})[0]
    np.testing.assert_allclose(got["loss"], fwd_loss, rtol=1e-6)
    for k, w in want.items():  # gradients: the same graph, but ORT's and the reference's float32 kernels
        np.testing.assert_allclose(got[k], w, rtol=1e-5, atol=1e-8 if ".m." in k else 1e-7, err_msg=k)
    for n in NAMES:  # and the formula as docs/semantics.md writes it
        w, m, v = literal_formula(feeds[n], grads[n], feeds[f"m.{n}"], feeds[f"v.{n}"], hp)
        np.testing.assert_allclose(got[f"new.{n}"], w, rtol=1e-5, atol=1e-7, err_msg=n)
        np.testing.assert_allclose(got[f"new.m.{n}"], m, rtol=1e-5, atol=1e-8, err_msg=n)
        np.testing.assert_allclose(got[f"new.v.{n}"], v, rtol=1e-5, atol=1e-11, err_msg=n)


def _float64_norm(grads) -> float:
    return float(np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in grads.values())))


@pytest.mark.parametrize("runtime", ["ort", "reference"])
@pytest.mark.parametrize("clip", ["off (0)", "off (inf)", "inactive", "active", "tiny"])
def test_clipping_matches_clip_grad_norm_then_adamw(built, runtime, clip):
    """g <- g * min(1, clip / (||g|| + 1e-6)) over all parameters together, before AdamW."""
    hp = make_hp(2e-3, 0.85, 0.99, 1e-6, 0.05, step=3)
    feeds = step_feeds(built["mode"], hp)
    _, grads = numpy_step(built, feeds)
    norm = _float64_norm(grads)
    value = {"off (0)": 0.0, "off (inf)": np.inf, "inactive": 2 * norm, "active": 0.3 * norm, "tiny": 1e-4}[clip]
    feeds["clip"] = np.array(value, np.float32)
    got = run_step(built, feeds, runtime)
    np.testing.assert_allclose(got["grad_norm"], norm, rtol=1e-5)
    coef = min(1.0, value / (norm + 1e-6)) if value > 0 else 1.0
    for n in NAMES:  # the literal formula on the clipped gradient, in float64
        w, m, v = literal_formula(feeds[n], grads[n] * coef, feeds[f"m.{n}"], feeds[f"v.{n}"], hp)
        np.testing.assert_allclose(got[f"new.{n}"], w, rtol=1e-5, atol=1e-7, err_msg=n)
        np.testing.assert_allclose(got[f"new.m.{n}"], m, rtol=1e-5, atol=1e-8, err_msg=n)
        np.testing.assert_allclose(got[f"new.v.{n}"], v, rtol=1e-5, atol=1e-11, err_msg=n)
    if coef == 1.0:  # off or inactive: bit for bit the unclipped step
        plain = run_step(built, {**feeds, "clip": np.array(0.0, np.float32)}, runtime)
        assert all(got[k].tobytes() == plain[k].tobytes() for k in plain)


def test_ort_and_reference_agree(built):
    feeds = step_feeds(built["mode"], make_hp(1e-3, step=1), seed=5)
    a, b = run_step(built, feeds, "ort"), run_step(built, feeds, "reference")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("runtime", ["ort", "reference"])
def test_lr0_wd0_leaves_params_bit_unchanged(built, runtime):
    feeds = step_feeds(built["mode"], make_hp(0.0, weight_decay=0.0, step=4))
    got = run_step(built, feeds, runtime)
    for n in NAMES:
        assert got[f"new.{n}"].tobytes() == feeds[n].tobytes(), n
        assert not np.array_equal(got[f"new.m.{n}"], feeds[f"m.{n}"]), n  # moments still move


def test_hp_values_are_honoured(built):
    base = make_hp(1e-2, 0.9, 0.999, 1e-8, 0.1, step=2)
    feeds = step_feeds(built["mode"], base, seed=3)
    ref = run_step(built, feeds)
    _, grads = numpy_step(built, feeds)
    changes = {"lr": 3e-2, "beta1": 0.5, "beta2": 0.9, "eps": 1e-3, "weight_decay": 0.7,
               "beta1h": 2.5, "beta2h": 7.0}
    for field, value in changes.items():
        hp = base.copy()
        hp[HP_FIELDS.index(field)] = value
        got = run_step(built, {**feeds, "hp": hp})
        moved = [not np.allclose(got[f"new.{n}"], ref[f"new.{n}"], rtol=1e-6, atol=0) for n in NAMES]
        assert all(moved), f"changing {field} left some parameters unchanged: {moved}"
        for n in NAMES:
            w, m, v = literal_formula(feeds[n], grads[n], feeds[f"m.{n}"], feeds[f"v.{n}"], hp)
            np.testing.assert_allclose(got[f"new.{n}"], w, rtol=1e-5, atol=1e-7, err_msg=f"{field}: {n}")
            np.testing.assert_allclose(got[f"new.m.{n}"], m, rtol=1e-5, atol=1e-9, err_msg=f"{field}: {n}")
            np.testing.assert_allclose(got[f"new.v.{n}"], v, rtol=1e-5, atol=1e-12, err_msg=f"{field}: {n}")


def test_training_reduces_loss(built):
    feeds = step_feeds(built["mode"], make_hp(1e-2, step=1), seed=7)
    losses = []
    for t in range(1, 16):
        feeds["hp"] = make_hp(3e-2, weight_decay=0.0, step=t)
        out = run_step(built, feeds)
        losses.append(float(out["loss"]))
        for n in NAMES:
            feeds[n], feeds[f"m.{n}"], feeds[f"v.{n}"] = out[f"new.{n}"], out[f"new.m.{n}"], out[f"new.v.{n}"]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.85 * losses[0], losses


def test_make_hp_rejects_step_0():
    with pytest.raises(ValueError, match="step"):
        make_hp(1e-3, step=0)
