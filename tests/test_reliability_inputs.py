"""Bad input at the Python API boundary: every row of the reliability table, on every runtime.

Each row is one malformed (tokens, positions, labels, hp) handed to ``rt.step``.
It must raise InputError (the documented class) whose message names the input,
the bad value and the allowed range, before anything runs: parameters, AdamW
moments and the step count are compared, bit for bit, before and after. At the
end of each runtime's table a valid step must give exactly what a fresh
runtime that saw only the valid steps gives, so a rejected batch left no trace
(ONNX Runtime's gradient buffers included).

A property-based test (hypothesis) then throws random batches, each part valid
or malformed in one of many ways, at ``step``: a batch the spec accepts must
train (finite loss, step count + 1), any other must raise InputError and change
nothing; replaying only the accepted batches on a fresh runtime must reproduce
the final parameters exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtimes
from runtimes.errors import InputError
from runtimes.hp import make_hp
from runtimes.validate import DENSE_SUM_TOL

RUNTIMES = ["ort", "ort-training", "reference"]
B, T = 2, 8
V, CTX = 256, 64  # the tiny preset


# --------------------------------------------------------------------------- helpers
def snapshot(rt) -> tuple:
    m, v = rt.moments()
    return rt.step_count, rt.parameters(), m, v


def assert_unchanged(before: tuple, after: tuple) -> None:
    assert after[0] == before[0], f"step count changed {before[0]} -> {after[0]}"
    for what, a, b in (("parameter", before[1], after[1]), ("m", before[2], after[2]), ("v", before[3], after[3])):
        assert a.keys() == b.keys()
        for n in a:
            assert np.array_equal(a[n], b[n]), f"{what} {n} changed"


def valid_batch(rt, mode: str, rng: np.random.Generator, b: int = B, t: int = T) -> dict:
    tokens = rng.integers(0, V, (b, t))
    labels = rng.integers(0, V, (b, t))
    if mode == "dense":
        labels = np.eye(V, dtype=np.float32)[labels]
    cfg = rt.art.config
    return {
        "tokens": tokens,
        "positions": np.tile(np.arange(t), (b, 1)),
        "labels": labels,
        "hp": make_hp(1e-3, cfg["beta1"], cfg["beta2"], cfg["eps"], cfg["weight_decay"], step=rt.step_count + 1),
    }


def put(a: np.ndarray, index, value, dtype=None) -> np.ndarray:
    a = np.array(a, dtype=dtype or a.dtype)
    a[index] = value
    return a


def hp_with(i: int, value):
    return lambda b, rt: {**b, "hp": put(b["hp"], i, value)}


def hp_for_step(delta: int):
    def f(b, rt):
        cfg = rt.art.config
        return {**b, "hp": make_hp(1e-3, cfg["beta1"], cfg["beta2"], cfg["eps"], cfg["weight_decay"],
                                   step=rt.step_count + 1 + delta)}
    return f


def shape(b: int, t: int):
    """tokens, positions and labels all (b, t): only the shape is wrong."""
    def f(batch, rt):
        rng = np.random.default_rng(1)
        labels = rng.integers(0, V, (b, t))
        if rt.art.label_mode == "dense":
            labels = np.eye(V, dtype=np.float32)[labels]
        return {**batch, "tokens": rng.integers(0, V, (b, t)), "positions": np.tile(np.arange(t), (b, 1)) % CTX,
                "labels": labels}
    return f


def dense_row(value_fn):
    def f(b, rt):
        lab = b["labels"].copy()
        value_fn(lab)
        return {**b, "labels": lab}
    return f


# --------------------------------------------------------------------------- the table
# (id, label mode, mutation of a valid batch, regex the message must match)
ROWS = [
    # token ids
    ("tokens-negative", "index", lambda b, rt: {**b, "tokens": put(b["tokens"], (0, 3), -1)},
     r"tokens\[0, 3\] = -1 is out of range: token ids \(vocab 256\) must be in \[0, 256\)"),
    ("tokens-eq-vocab", "index", lambda b, rt: {**b, "tokens": put(b["tokens"], (1, 7), V)},
     r"tokens\[1, 7\] = 256 is out of range: .* must be in \[0, 256\)"),
    ("tokens-huge-uint64", "index", lambda b, rt: {**b, "tokens": put(b["tokens"], (0, 0), 2**63, np.uint64)},
     r"tokens\[0, 0\] = 9223372036854775808 is out of range: .* \[0, 256\)"),
    # positions
    ("positions-negative", "index", lambda b, rt: {**b, "positions": put(b["positions"], (0, 0), -1)},
     r"positions\[0, 0\] = -1 is out of range: positions \(context 64\) must be in \[0, 64\)"),
    ("positions-eq-context", "index", lambda b, rt: {**b, "positions": put(b["positions"], (1, 2), CTX)},
     r"positions\[1, 2\] = 64 is out of range: .* \[0, 64\)"),
    # T and B
    ("seq-gt-context", "index", shape(1, CTX + 1), r"seq length 65 > context 64: T must be in \[1, 64\]"),
    ("batch-zero", "index", shape(0, T), r"tokens has shape \(0, 8\): batch and seq must both be >= 1"),
    ("seq-zero", "index", shape(B, 0), r"tokens has shape \(2, 0\): batch and seq must both be >= 1"),
    ("dense-batch-zero", "dense", shape(0, T), r"tokens has shape \(0, 8\): batch and seq must both be >= 1"),
    # dtypes and kinds
    ("tokens-float", "index", lambda b, rt: {**b, "tokens": b["tokens"].astype(np.float32)},
     r"tokens must have an integer dtype \(int64\), got float32"),
    ("tokens-bool", "index", lambda b, rt: {**b, "tokens": b["tokens"] > 100},
     r"tokens must have an integer dtype \(int64\), got bool"),
    ("tokens-list", "index", lambda b, rt: {**b, "tokens": b["tokens"].tolist()},
     r"tokens must be a numpy integer array, got list"),
    ("tokens-1d", "index", lambda b, rt: {**b, "tokens": b["tokens"][0]},
     r"tokens must have shape \(batch, seq\), got \(8,\)"),
    ("positions-float64", "index", lambda b, rt: {**b, "positions": b["positions"].astype(np.float64)},
     r"positions must have an integer dtype \(int64\), got float64"),
    ("labels-float-in-index-mode", "index", lambda b, rt: {**b, "labels": b["labels"].astype(np.float32)},
     r"labels must be integer \(B, T\) next-token ids for these index-mode artifacts, got float32\[2, 8\]"),
    ("labels-int-in-dense-mode", "dense", lambda b, rt: {**b, "labels": b["labels"].argmax(-1)},
     r"labels must be float32 \(B, T, 256\) distributions for these dense-mode artifacts, got int64\[2, 8\]"),
    ("labels-float64-in-dense-mode", "dense", lambda b, rt: {**b, "labels": b["labels"].astype(np.float64)},
     r"labels must be float32 .* got float64\[2, 8, 256\]"),
    ("hp-float64", "index", lambda b, rt: {**b, "hp": b["hp"].astype(np.float64)},
     r"hp must be float32, got float64"),
    ("hp-list", "index", lambda b, rt: {**b, "hp": b["hp"].tolist()}, r"hp must be a numpy float32 array of 7, got list"),
    # shapes that disagree
    ("positions-shape", "index", lambda b, rt: {**b, "positions": b["positions"][:, :-1]},
     r"positions shape \(2, 7\) differs from tokens shape \(2, 8\)"),
    ("labels-shape", "index", lambda b, rt: {**b, "labels": b["labels"][:1]},
     r"labels shape \(1, 8\) differs from tokens shape \(2, 8\)"),
    ("dense-labels-shape", "dense", lambda b, rt: {**b, "labels": b["labels"][:, :, :-1]},
     r"labels shape \(2, 8, 255\) must be \(2, 8, 256\) \(tokens shape \+ vocab\)"),
    ("dense-labels-seq", "dense", lambda b, rt: {**b, "labels": b["labels"][:, 1:]},
     r"labels shape \(2, 7, 256\) must be \(2, 8, 256\)"),
    # index labels out of range
    ("labels-eq-vocab", "index", lambda b, rt: {**b, "labels": put(b["labels"], (0, 5), V)},
     r"labels\[0, 5\] = 256 is out of range: label ids \(vocab 256\) must be in \[0, 256\)"),
    ("labels-negative", "index", lambda b, rt: {**b, "labels": put(b["labels"], (1, 0), -3)},
     r"labels\[1, 0\] = -3 is out of range"),
    # dense labels
    ("dense-negative", "dense", dense_row(lambda a: (a.__setitem__((0, 1), 0), a.__setitem__((0, 1, 3), -0.5),
                                                     a.__setitem__((0, 1, 4), 1.5))),
     r"labels\[0, 1, 3\] = -0.5 is negative: dense labels must be >= 0"),
    ("dense-nan", "dense", dense_row(lambda a: a.__setitem__((1, 2, 7), np.nan)),
     r"labels\[1, 2, 7\] is nan: dense labels must be finite"),
    ("dense-inf", "dense", dense_row(lambda a: a.__setitem__((1, 2, 7), np.inf)),
     r"labels\[1, 2, 7\] is inf: dense labels must be finite"),
    ("dense-row-sum-half", "dense", dense_row(lambda a: a.__setitem__((0, 4), a[0, 4] * 0.5)),
     r"labels row \[0, 4\] sums to 0.5: each dense label row must sum to 1 \(tolerance 0.001\)"),
    ("dense-row-sum-over-tol", "dense", dense_row(lambda a: a.__setitem__((1, 7), a[1, 7] * (1 + 2 * DENSE_SUM_TOL))),
     r"labels row \[1, 7\] sums to 1.002: .* \(tolerance 0.001\)"),
    ("dense-row-zero", "dense", dense_row(lambda a: a.__setitem__((1, 0), 0)),
     r"labels row \[1, 0\] sums to 0: "),
    # hp
    ("hp-len6", "index", lambda b, rt: {**b, "hp": b["hp"][:6]}, r"hp must have shape \(7,\) .*got \(6,\)"),
    ("hp-len8", "index", lambda b, rt: {**b, "hp": np.append(b["hp"], np.float32(0))}, r"got \(8,\)"),
    ("hp-2d", "index", lambda b, rt: {**b, "hp": b["hp"][None]}, r"got \(1, 7\)"),
    ("hp-lr-nan", "index", hp_with(0, np.nan), r"hp\[0\] \(lr\) must be finite, got nan"),
    ("hp-beta2-inf", "index", hp_with(2, np.inf), r"hp\[2\] \(beta2\) must be finite, got inf"),
    ("hp-beta2h-nan", "index", hp_with(6, np.nan), r"hp\[6\] \(beta2h\) must be finite, got nan"),
    ("hp-lr-negative", "index", hp_with(0, -1e-3), r"hp\[0\] \(lr\) must be >= 0, got -0.001"),
    ("hp-beta1-one", "index", hp_with(1, 1.0), r"hp\[1\] \(beta1\) must be in \[0, 1\), got 1.0"),
    ("hp-beta1-negative", "index", hp_with(1, -0.1), r"hp\[1\] \(beta1\) must be in \[0, 1\), got -0.1"),
    ("hp-beta2-over-one", "index", hp_with(2, 1.5), r"hp\[2\] \(beta2\) must be in \[0, 1\), got 1.5"),
    ("hp-eps-zero", "index", hp_with(3, 0.0), r"hp\[3\] \(eps\) must be > 0, got 0.0"),
    ("hp-eps-negative", "index", hp_with(3, -1e-8), r"hp\[3\] \(eps\) must be > 0, got -1e-08"),
    ("hp-wd-negative", "index", hp_with(4, -0.01), r"hp\[4\] \(weight_decay\) must be >= 0, got -0.01"),
    ("hp-beta1h-next-step", "index", hp_for_step(+1),
     r"hp\[5\] \(beta1h\) = .* disagrees with step t=\d+: expected 1/\(1-beta1\^\d+\)"),
    ("hp-beta1h-previous-step", "index", hp_for_step(-1), r"hp\[5\] \(beta1h\) = .* disagrees with step t=\d+"),
    ("hp-beta2h-off", "index", lambda b, rt: {**b, "hp": put(b["hp"], 6, b["hp"][6] * 1.01)},
     r"hp\[6\] \(beta2h\) = .* disagrees with step t=\d+: .*relative tolerance 0.0001"),
]
ORT_TRAINING_ROWS = [  # valid hp that ONNX Runtime's optimizer model cannot honour: it fixes them at build time
    ("hp-beta1-not-built", "index", lambda b, rt: {**b, "hp": make_hp(1e-3, 0.8, 0.999, 1e-8, 0.01, step=rt.step_count + 1)},
     r"hp\[1\] \(beta1\) = 0.8.*optimizer_model.onnx was built with beta1=0.9"),
    ("hp-wd-not-built", "index", lambda b, rt: {**b, "hp": make_hp(1e-3, 0.9, 0.999, 1e-8, 0.1, step=rt.step_count + 1)},
     r"hp\[4\] \(weight_decay\) = .*built with weight_decay=0.01"),
]
CASES = [(r, *row) for r in RUNTIMES for row in ROWS] + [("ort-training", *row) for row in ORT_TRAINING_ROWS]


class Subject:
    """A runtime that has taken real steps (so its moments are not zeros), and the valid batches it took."""

    def __init__(self, folder, runtime: str, mode: str):
        self.folder, self.runtime, self.mode = folder, runtime, mode
        self.rt = runtimes.load(folder, runtime=runtime, threads=1)
        self.rng = np.random.default_rng(0)
        self.taken: list[dict] = []
        self.losses: list[float] = []
        for _ in range(2):
            self.valid_step()

    def valid_step(self, b: dict | None = None) -> float:
        b = b if b is not None else valid_batch(self.rt, self.mode, self.rng)
        loss = self.rt.step(**b)
        self.taken.append(b)
        self.losses.append(loss)
        return loss


_subjects: dict = {}


@pytest.fixture
def subject(request, tiny_index, tiny_dense):
    def get(runtime: str, mode: str) -> Subject:
        key = (runtime, mode)
        if key not in _subjects:
            _subjects[key] = Subject(tiny_index if mode == "index" else tiny_dense, runtime, mode)
        return _subjects[key]
    yield get


@pytest.mark.parametrize("runtime,row,mode,mutate,message", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_row(subject, runtime, row, mode, mutate, message):
    s = subject(runtime, mode)
    bad = mutate(valid_batch(s.rt, mode, np.random.default_rng(5)), s.rt)
    before = snapshot(s.rt)
    with pytest.raises(InputError, match=message):
        s.rt.step(**bad)
    assert_unchanged(before, snapshot(s.rt))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_bad_batch_in_loss_gradients_logits(subject, runtime):
    """The same checks guard the calls that do not train."""
    s = subject(runtime, "index")
    b = valid_batch(s.rt, "index", np.random.default_rng(6))
    bad_tokens = put(b["tokens"], (1, 1), -7)
    before = snapshot(s.rt)
    for call in (lambda: s.rt.loss(bad_tokens, b["positions"], b["labels"]),
                 lambda: s.rt.gradients(bad_tokens, b["positions"], b["labels"]),
                 lambda: s.rt.logits(bad_tokens, b["positions"])):
        with pytest.raises(InputError, match=r"tokens\[1, 1\] = -7 is out of range"):
            call()
    d = subject(runtime, "dense")
    d_before = snapshot(d.rt)
    with pytest.raises(InputError, match=r"labels row \[0, 0\] sums to 2"):
        d.rt.gradients(b["tokens"], b["positions"], np.eye(V, dtype=np.float32)[b["labels"]] * 2)
    assert_unchanged(before, snapshot(s.rt))
    assert_unchanged(d_before, snapshot(d.rt))


@pytest.mark.parametrize("mode", ["index", "dense"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_rejected_rows_leave_no_trace(subject, runtime, mode):
    """After the table (or alone): one more valid step equals a fresh runtime fed only the valid steps."""
    s = subject(runtime, mode)
    s.valid_step()
    control = runtimes.load(s.folder, runtime=runtime, threads=1)
    losses = [control.step(**b) for b in s.taken]
    assert control.step_count == s.rt.step_count
    assert losses == s.losses
    got, want = s.rt.parameters(), control.parameters()
    for n in want:
        assert np.array_equal(got[n], want[n]), n


@pytest.mark.parametrize("mode", ["index", "dense"])
def test_dense_sum_within_tolerance_trains(subject, mode):
    """The documented tolerance: a row summing to 1 +- DENSE_SUM_TOL/2 is accepted."""
    if mode == "index":  # index labels: the widest integer dtypes are accepted too
        s = subject("ort", "index")
        b = valid_batch(s.rt, "index", np.random.default_rng(7))
        b = {**b, "tokens": b["tokens"].astype(np.uint64), "positions": b["positions"].astype(np.int8),
             "labels": b["labels"].astype(np.uint16)}
    else:
        s = subject("ort", "dense")
        b = valid_batch(s.rt, "dense", np.random.default_rng(7))
        b["labels"][0, 0] *= np.float32(1 + DENSE_SUM_TOL / 2)
        b["labels"][1, 1] *= np.float32(1 - DENSE_SUM_TOL / 2)
    n = s.rt.step_count
    assert np.isfinite(s.valid_step(b))
    assert s.rt.step_count == n + 1


# --------------------------------------------------------------------------- property-based
INT_OK = [np.int64, np.int32, np.int16, np.uint16, np.uint64]


@st.composite
def batches(draw, mode: str, cfg: dict, step: int):
    """(batch dict, reasons it is malformed): each part valid, or broken in one way."""
    bad: list[str] = []
    broken = set() if draw(st.booleans()) else draw(
        st.sets(st.sampled_from(["shape", "tokens", "positions", "labels", "hp"]), min_size=1, max_size=2))

    def kind(part: str, bad_kinds: list[str]) -> str:
        return draw(st.sampled_from(bad_kinds)) if part in broken else "ok"

    b = draw(st.sampled_from([1, 2, 3])) if "shape" not in broken else draw(st.sampled_from([0, 1, 2]))
    t = draw(st.sampled_from([1, 2, 5, 8, CTX])) if "shape" not in broken else draw(st.sampled_from([0, CTX + 1]))
    if b == 0 or t == 0 or t > CTX:
        bad.append("shape")
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    tkind = kind("tokens", ["neg", "vocab", "huge", "float", "bool"])
    tok = rng.integers(0, V, (b, t))
    if tkind in ("neg", "vocab", "huge") and tok.size:
        tok[rng.integers(b), rng.integers(t)] = {"neg": -1, "vocab": V, "huge": 2**40}[tkind]
        bad.append("tokens value")
    dtype = draw(st.sampled_from(INT_OK))
    if tkind == "float":
        tok, _ = tok.astype(np.float32), bad.append("tokens dtype")
    elif tkind == "bool":
        tok, _ = tok > 128, bad.append("tokens dtype")
    elif tkind == "ok" or not tok.size:
        tok = tok.astype(dtype)

    pkind = kind("positions", ["neg", "ctx", "shape", "float"])
    pos = np.tile(np.arange(t), (b, 1)) % CTX
    if pkind == "ok" and draw(st.booleans()):  # any positions in [0, context) are valid, not only 0..T-1
        pos = rng.integers(0, CTX, (b, t))
    if pkind in ("neg", "ctx") and pos.size:
        pos[rng.integers(b), rng.integers(t)] = -1 if pkind == "neg" else CTX
        bad.append("positions value")
    elif pkind == "shape":
        pos, _ = np.zeros((b + 1, t), np.int64), bad.append("positions shape")
    elif pkind == "float":
        pos, _ = pos.astype(np.float32), bad.append("positions dtype")

    lkind = kind("labels", ["range", "dtype", "shape"] + (["neg", "nan", "sum"] if mode == "dense" else []))
    ids = rng.integers(0, V, (b, t))
    if mode == "index":
        lab = ids
        if lkind == "range" and lab.size:
            lab[rng.integers(b), rng.integers(t)] = V
            bad.append("labels value")
        elif lkind == "dtype":
            lab, _ = lab.astype(np.float32), bad.append("labels dtype")
        elif lkind == "shape":
            lab, _ = lab[:, :-1] if t else np.zeros((b, 1), np.int64), bad.append("labels shape")
    else:
        p = rng.random((b, t, V)) ** 8  # soft rows, normalised in float64
        soft = draw(st.booleans())  # soft distributions or one-hot rows
        lab = (p / p.sum(-1, keepdims=True)).astype(np.float32) if soft else np.eye(V, dtype=np.float32)[ids]
        if lkind == "range":  # no such thing for dense labels: a one-hot of an id >= vocab cannot be built
            lkind = "ok"
        if lkind == "dtype":
            lab, _ = lab.astype(np.float64), bad.append("labels dtype")
        elif lkind == "shape":
            lab, _ = lab[..., 1:], bad.append("labels shape")
        elif lkind in ("neg", "nan", "sum") and lab.size:
            i, j = rng.integers(b), rng.integers(t)
            if lkind == "neg":
                lab[i, j, 0] = -0.25
            elif lkind == "nan":
                lab[i, j, 3] = np.nan
            else:
                lab[i, j] *= 1.5
            bad.append("labels value")

    hkind = kind("hp", ["f64", "len", "nan", "lr", "beta", "eps", "wd", "step"])
    lr = draw(st.floats(0, 1e-2, allow_subnormal=False))
    hp = make_hp(lr, cfg["beta1"], cfg["beta2"], cfg["eps"], cfg["weight_decay"], step=step)
    if hkind != "ok":
        bad.append(f"hp {hkind}")
    if hkind == "f64":
        hp = hp.astype(np.float64)
    elif hkind == "len":
        hp = hp[:draw(st.integers(0, 6))]
    elif hkind == "nan":
        hp[draw(st.integers(0, 6))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif hkind == "lr":
        hp[0] = -draw(st.floats(1e-9, 1.0, allow_subnormal=False))
    elif hkind == "beta":
        hp[draw(st.integers(1, 2))] = draw(st.sampled_from([1.0, 1.5, -0.01]))
    elif hkind == "eps":
        hp[3] = draw(st.sampled_from([0.0, -1e-8]))
    elif hkind == "wd":
        hp[4] = -draw(st.floats(1e-6, 1.0, allow_subnormal=False))
    elif hkind == "step":
        hp = make_hp(lr, cfg["beta1"], cfg["beta2"], cfg["eps"], cfg["weight_decay"], step=step + draw(st.sampled_from([1, 2, 5])))
    return {"tokens": tok, "positions": pos, "labels": lab, "hp": hp}, bad


@pytest.mark.parametrize("runtime,mode,examples", [("ort", "index", 60), ("ort", "dense", 40),
                                                   ("ort-training", "index", 40), ("reference", "index", 12)])
def test_random_batches_train_or_raise_input_error(tiny_index, tiny_dense, runtime, mode, examples):
    folder = tiny_index if mode == "index" else tiny_dense
    rt = runtimes.load(folder, runtime=runtime, threads=1)
    cfg = rt.art.config
    accepted: list[dict] = []
    outcomes = {"trained": 0, "rejected": 0}

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def one(data):
        batch, bad = data.draw(batches(mode, cfg, rt.step_count + 1))
        before = snapshot(rt)
        if bad:
            with pytest.raises(InputError):
                rt.step(**batch)
            assert_unchanged(before, snapshot(rt))
            outcomes["rejected"] += 1
        else:
            loss = rt.step(**batch)
            assert np.isfinite(loss) and rt.step_count == before[0] + 1
            accepted.append({k: np.copy(v) for k, v in batch.items()})
            outcomes["trained"] += 1

    one()
    assert outcomes["trained"] and outcomes["rejected"], outcomes
    # No trace of the rejected batches: replaying only the accepted ones gives the same state.
    control = runtimes.load(folder, runtime=runtime, threads=1)
    for b in accepted:
        control.step(**b)
    assert control.step_count == rt.step_count
    got, want = rt.parameters(), control.parameters()
    for n in want:
        assert np.array_equal(got[n], want[n]), n
