"""Self-checks of the independent torch oracle (tests/oracle/torch_gpt2.py).

The oracle is what every runtime is compared against, so it is checked here
against things that do not share its code: finite differences, a batched
implementation built from torch.nn.functional, the causal property, the
equivalence of dense one-hot and index labels, and the AdamW formula of
docs/semantics.md written out in numpy.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

try:  # tests/ is a rootdir-style folder (no __init__.py): pytest puts it on sys.path
    from oracle import TorchGPT2, lcg_weights, param_layout, random_weights
except ImportError:  # tests/ became a package
    from tests.oracle import TorchGPT2, lcg_weights, param_layout, random_weights

CFG = {"vocab": 11, "context": 6, "d_model": 8, "n_heads": 2, "d_ff": 12, "n_layers": 2}


def _batch(cfg, b=2, t=5, seed=1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg["vocab"], size=(b, t), dtype=np.int64)
    positions = np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy()
    labels = rng.integers(0, cfg["vocab"], size=(b, t), dtype=np.int64)
    return tokens, positions, labels


def _model(dtype="float64", seed=0, cfg=CFG):
    return TorchGPT2(cfg, random_weights(cfg, seed=seed, scale=0.3), dtype=dtype)


def _batched_logits(cfg, w, tokens, positions):
    """A second GPT-2, batched over heads and built from torch.nn.functional.

    Value bias added before attention (the usual placement): equal to the
    seed's after-attention placement because every row of p sums to 1.
    """
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in w.items()}
    d = cfg["d_model"]
    tok = torch.tensor(tokens)
    pos = torch.tensor(positions)
    b, n = tok.shape
    x = t["wte"][tok] + t["wpe"][pos]
    for layer in range(cfg["n_layers"]):
        p = f"h{layer}."
        a = F.layer_norm(x, (d,), t[p + "ln1_g"], t[p + "ln1_b"], eps=1e-5)
        q = torch.einsum("btd,hed->bhte", a, t[p + "w_q"]) + t[p + "b_q"][None, :, None, :]
        k = torch.einsum("btd,hed->bhte", a, t[p + "w_k"]) + t[p + "b_k"][None, :, None, :]
        v = torch.einsum("btd,hed->bhte", a, t[p + "w_v"]) + t[p + "b_v"][None, :, None, :]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b,h,n,dh)
        o = o.transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(o, t[p + "w_o"], t[p + "b_o"])
        m = F.layer_norm(x, (d,), t[p + "ln2_g"], t[p + "ln2_b"], eps=1e-5)
        f = F.gelu(F.linear(m, t[p + "fc_w"], t[p + "fc_b"]), approximate="tanh")
        x = x + F.linear(f, t[p + "pr_w"], t[p + "pr_b"])
    x = F.layer_norm(x, (d,), t["lnf_g"], t["lnf_b"], eps=1e-5)
    return F.linear(x, t["wte"]).numpy()


def test_layout_names_shapes_order():
    layout = param_layout(CFG)
    names = [n for n, _ in layout]
    assert names[:2] == ["wte", "wpe"] and names[-2:] == ["lnf_g", "lnf_b"]
    assert names[2:18] == [
        "h0." + s
        for s in (
            "ln1_g ln1_b w_q b_q w_k b_k w_v b_v w_o b_o ln2_g ln2_b fc_w fc_b pr_w pr_b".split()
        )
    ]
    shapes = dict(layout)
    assert shapes["h1.w_q"] == (2, 4, 8) and shapes["h1.b_v"] == (2, 4)
    assert shapes["h0.fc_w"] == (12, 8) and shapes["h0.pr_w"] == (8, 12)
    assert len(layout) == 2 + 16 * CFG["n_layers"] + 2


def test_matches_batched_functional_implementation():
    w = random_weights(CFG, seed=3, scale=0.3)
    model = TorchGPT2(CFG, w, dtype="float64")
    tokens, positions, _ = _batch(CFG, b=3, t=6)
    positions = positions[:, ::-1].copy()  # any positions, not only 0..T-1
    with model._settings():
        batched = _batched_logits(CFG, w, tokens, positions)
    np.testing.assert_allclose(model.logits(tokens, positions), batched, rtol=1e-10, atol=1e-12)


def test_float32_close_to_float64():
    w = random_weights(CFG, seed=4, scale=0.3)
    tokens, positions, labels = _batch(CFG)
    l32 = TorchGPT2(CFG, w, dtype="float32").loss(tokens, positions, labels)
    l64 = TorchGPT2(CFG, w, dtype="float64").loss(tokens, positions, labels)
    assert abs(l32 - l64) < 1e-5
    assert TorchGPT2(CFG, w).logits(tokens, positions).dtype == np.float32


def test_gradients_match_finite_differences():
    model = _model()
    tokens, positions, labels = _batch(CFG)
    loss, grads = model.grads(tokens, positions, labels)
    assert list(grads) == [n for n, _ in param_layout(CFG)]
    base = model.parameters()
    h = 1e-6
    rng = np.random.default_rng(0)

    def loss_at(weights):
        return TorchGPT2(CFG, weights, dtype="float64").loss(tokens, positions, labels)

    # every tensor: a few sampled entries, central differences
    for name, value in base.items():
        flat_idx = rng.choice(value.size, size=min(3, value.size), replace=False)
        for i in flat_idx:
            idx = np.unravel_index(i, value.shape)
            plus = {k: v.copy() for k, v in base.items()}
            minus = {k: v.copy() for k, v in base.items()}
            plus[name][idx] += h
            minus[name][idx] -= h
            numeric = (loss_at(plus) - loss_at(minus)) / (2 * h)
            assert numeric == pytest.approx(grads[name][idx], rel=1e-5, abs=1e-8), (name, idx)

    # all parameters at once: a random direction
    u = {k: rng.standard_normal(v.shape) for k, v in base.items()}
    eps = 1e-5
    lp = loss_at({k: base[k] + eps * u[k] for k in base})
    lm = loss_at({k: base[k] - eps * u[k] for k in base})
    directional = sum(float(np.sum(grads[k] * u[k])) for k in base)
    assert (lp - lm) / (2 * eps) == pytest.approx(directional, rel=1e-6)
    assert loss == pytest.approx(model.loss(tokens, positions, labels), rel=1e-14)


def test_torch_gradcheck_on_embeddings_and_attention():
    """torch.autograd.gradcheck through the oracle's forward, on two tensors."""
    model = _model()
    tokens, positions, labels = _batch(CFG, b=1, t=4)
    tok, pos = model._ids(tokens, positions)
    lab = model._labels(labels, tuple(tok.shape))

    def fn(wq, wpe):
        saved = model.params["h1.w_q"], model.params["wpe"]
        model.params["h1.w_q"], model.params["wpe"] = wq, wpe
        try:
            return model._loss(model._forward(tok, pos), lab)
        finally:
            model.params["h1.w_q"], model.params["wpe"] = saved

    wq = model.params["h1.w_q"].detach().clone().requires_grad_(True)
    wpe = model.params["wpe"].detach().clone().requires_grad_(True)
    with model._settings():  # one thread, deterministic, as the oracle's own calls
        assert torch.autograd.gradcheck(fn, (wq, wpe), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_causal_future_tokens_do_not_change_earlier_logits(dtype):
    model = _model(dtype=dtype)
    tokens, positions, _ = _batch(CFG, b=2, t=6)
    base = model.logits(tokens, positions)
    for t0 in range(1, 6):
        changed = tokens.copy()
        changed[:, t0] = (changed[:, t0] + 1) % CFG["vocab"]
        out = model.logits(changed, positions)
        np.testing.assert_array_equal(out[:, :t0], base[:, :t0])
        assert np.abs(out[:, t0:] - base[:, t0:]).max() > 1e-6


def test_dense_one_hot_labels_equal_index_labels():
    model = _model()
    tokens, positions, labels = _batch(CFG, b=2, t=5)
    dense = np.eye(CFG["vocab"], dtype=np.float32)[labels]
    assert dense.shape == (2, 5, CFG["vocab"])
    l_idx, g_idx = model.grads(tokens, positions, labels)
    l_dense, g_dense = model.grads(tokens, positions, dense)
    assert l_dense == pytest.approx(l_idx, rel=1e-13)
    for name in g_idx:
        np.testing.assert_allclose(g_dense[name], g_idx[name], rtol=1e-10, atol=1e-14)


def test_loss_is_mean_negative_log_likelihood():
    model = _model()
    tokens, positions, labels = _batch(CFG, b=2, t=5)
    logits = model.logits(tokens, positions)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = -np.mean(np.take_along_axis(logp, labels[..., None], -1))
    assert model.loss(tokens, positions, labels) == pytest.approx(expected, rel=1e-12)
    # soft (non one-hot) dense labels: -sum(labels * logp), mean over positions
    soft = np.random.default_rng(2).random((2, 5, CFG["vocab"]))
    soft /= soft.sum(-1, keepdims=True)
    expected_soft = -np.mean(np.sum(soft * logp, -1))
    assert model.loss(tokens, positions, soft) == pytest.approx(expected_soft, rel=1e-12)


def _adamw_numpy(w, m, v, g, t, lr, b1, b2, eps, wd):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    beta1h = 1.0 / (1 - b1**t)
    beta2h = 1.0 / (1 - b2**t)
    w = w * (1 - lr * wd) - lr * (m * beta1h) / (np.sqrt(v * beta2h) + eps)
    return w, m, v


def test_adamw_steps_equal_the_design_formula():
    hp = dict(lr=3e-2, b1=0.8, b2=0.95, eps=1e-6, wd=0.1)
    model = _model()
    batches = [_batch(CFG, seed=s) for s in range(3)]
    w = model.parameters()
    m = {k: np.zeros_like(x) for k, x in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    expected_losses = []
    for t, batch in enumerate(batches, start=1):
        # the gradient at the numpy-updated weights, from a fresh oracle
        loss, g = TorchGPT2(CFG, w, dtype="float64").grads(*batch)
        expected_losses.append(loss)
        for k in w:
            w[k], m[k], v[k] = _adamw_numpy(w[k], m[k], v[k], g[k], t, **hp)
    losses = model.train(
        batches, lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"], weight_decay=hp["wd"]
    )
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-12)
    assert model.steps == 3
    got = model.parameters()
    m_got, v_got = model.moments()
    for k in w:
        np.testing.assert_allclose(got[k], w[k], rtol=1e-10, atol=1e-13, err_msg=k)
        np.testing.assert_allclose(m_got[k], m[k], rtol=1e-10, atol=1e-15, err_msg=k)
        np.testing.assert_allclose(v_got[k], v[k], rtol=1e-10, atol=1e-18, err_msg=k)
        np.testing.assert_array_equal(model.exp_avg(k), m_got[k])
        np.testing.assert_array_equal(model.exp_avg_sq(k), v_got[k])


def test_train_resumes_across_calls_and_is_deterministic():
    batches = [_batch(CFG, seed=s) for s in range(4)]
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    a = _model(dtype="float32")
    la = a.train(batches[:2], **kw) + a.train(batches[2:], **kw)
    b = _model(dtype="float32")
    lb = b.train(iter(batches), **kw)
    assert la == lb
    for k, x in a.parameters().items():
        np.testing.assert_array_equal(x, b.parameters()[k])
    json.dumps(lb)  # plain floats


def test_moments_are_zero_before_training_and_weights_are_copied():
    w = random_weights(CFG, seed=5)
    snapshot = {k: v.copy() for k, v in w.items()}
    model = TorchGPT2(CFG, w)
    assert not model.exp_avg("wte").any() and not model.exp_avg_sq("lnf_b").any()
    model.train([_batch(CFG)], lr=0.1)
    for k in w:
        np.testing.assert_array_equal(w[k], snapshot[k])
    assert model.exp_avg("wte").any()


def test_training_lowers_the_loss_on_a_repeated_batch():
    model = _model(dtype="float32")
    batch = _batch(CFG)
    losses = model.train([batch] * 30, lr=1e-2, weight_decay=0.0)
    assert losses[-1] < losses[0] - 0.5
    assert all(math.isfinite(x) for x in losses)


def test_lcg_init_follows_design():
    cfg = {"vocab": 5, "context": 3, "d_model": 4, "n_heads": 2, "d_ff": 6, "n_layers": 1}
    w = lcg_weights(cfg, seed=42)
    rng = (42 * 1103515245 + 12345) & 0x7FFFFFFF
    assert w["wte"][0, 0] == np.float32(((rng >> 7) / 8388608.0 - 1.0) * 0.02)
    assert all(x.dtype == np.float32 for x in w.values())
    assert np.all(np.abs(w["wte"]) <= 0.02)
    assert np.all(w["h0.ln1_g"] == 1) and not w["h0.b_v"].any()
    seedw = lcg_weights(cfg, seed=42, init="seed")
    for name in ("wte", "wpe", "h0.w_q", "h0.w_o", "h0.fc_w", "h0.pr_w"):
        assert np.all(seedw[name] < 0), name
    # the q/k/v of head 0 are drawn before head 1's: w_k[0] follows w_q[0] in the stream
    rng = 42
    for _ in range(5 * 4 + 3 * 4 + 2 * 4):  # wte, wpe, w_q[0]
        rng = (rng * 1103515245 + 12345) & 0x7FFFFFFF
    rng = (rng * 1103515245 + 12345) & 0x7FFFFFFF
    assert w["h0.w_k"][0, 0, 0] == np.float32(((rng >> 7) / 8388608.0 - 1.0) * 0.02)


def test_input_errors():
    w = random_weights(CFG)
    with pytest.raises(ValueError, match="missing"):
        TorchGPT2(CFG, {k: v for k, v in w.items() if k != "wte"})
    bad = dict(w)
    bad["h0.w_q"] = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match="h0.w_q"):
        TorchGPT2(CFG, bad)
    with pytest.raises(ValueError, match="dtype"):
        TorchGPT2(CFG, w, dtype="float16")
    with pytest.raises(ValueError, match="n_heads"):
        TorchGPT2(dict(CFG, n_heads=3), w)
    model = TorchGPT2(CFG, w)
    tokens, positions, labels = _batch(CFG)
    with pytest.raises(ValueError, match="tokens"):
        model.logits(tokens + CFG["vocab"], positions)
    with pytest.raises(ValueError, match="positions"):
        model.logits(tokens, positions + CFG["context"])
    with pytest.raises(ValueError, match="labels"):
        model.loss(tokens, positions, labels[:, :2])
    with pytest.raises(ValueError, match="lr"):
        model.train([], lr=0.0)


def test_global_torch_settings_are_restored():
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    model = TorchGPT2(CFG, random_weights(CFG), threads=1)
    model.grads(*_batch(CFG))
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == det
