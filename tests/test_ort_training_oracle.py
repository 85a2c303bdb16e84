"""ort-training against the independent PyTorch oracle, both label modes.

Tolerances (float32): logits and loss at init 1e-5 (absolute); every
parameter's gradient 1e-5 relative per tensor (max|g - g_ref| / max|g_ref|,
see parity_util.rel_err for the exactly-zero gradient of b_k);
a 10-step AdamW loss trajectory 1e-4 (absolute).
"""

import numpy as np
import pytest

import runtimes
from tests.oracle.torch_gpt2 import TorchGPT2
from tests.parity_util import F32, batches, compare_state, floored_errors, report

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01


@pytest.fixture(scope="module")
def setups(tiny_index, tiny_dense):
    return {"index": tiny_index, "dense": tiny_dense}


@pytest.mark.parametrize("mode", ["index", "dense"])
def test_init_logits_loss_and_gradients(setups, mode):
    rt = runtimes.load(setups[mode], runtime="ort-training")
    cfg = rt.art.config
    oracle = TorchGPT2(cfg, rt.art.initial_weights())
    for seq in (cfg["context"], 23):  # the full context and a shorter T
        tok, pos, lab = batches(cfg, 1, batch=3, seq=seq, seed=seq)[0]
        logits, ref_logits = rt.logits(tok, pos), oracle.logits(tok, pos)
        assert logits.shape == (3, seq, cfg["vocab"])
        assert np.abs(logits - ref_logits).max() <= 1e-5
        assert abs(rt.loss(tok, pos, lab) - oracle.loss(tok, pos, lab)) <= 1e-5
    ref_loss, ref_grads = oracle.grads(tok, pos, lab)
    grads = rt.gradients(tok, pos, lab)
    report(f"ort-training gradients vs torch ({mode})", floored_errors(grads, ref_grads), 1e-5)


@pytest.mark.parametrize("mode", ["index", "dense"])
def test_ten_step_adamw_trajectory(setups, mode):
    rt = runtimes.load(setups[mode], runtime="ort-training")
    cfg = rt.art.config
    data = batches(cfg, 10, batch=2, seed=1)
    oracle = TorchGPT2(cfg, rt.art.initial_weights())
    ref = oracle.train(data, lr=F32(LR), betas=(F32(BETAS[0]), F32(BETAS[1])), eps=F32(EPS), weight_decay=F32(WD))
    ours = [rt.step(*b, runtimes.make_hp(LR, *BETAS, EPS, WD, step=t + 1)) for t, b in enumerate(data)]
    diffs = np.abs(np.array(ours) - np.array(ref))
    print(f"\nort-training 10-step losses vs torch ({mode}): max abs diff {diffs.max():.3g}")
    assert diffs.max() <= 1e-4, (ours, ref)
    assert ours[-1] < ours[0]
    params = rt.parameters()
    compare_state(f"ort-training weights after 10 steps ({mode})", params, oracle.parameters(), 1e-4,
                  LR, len(data))
