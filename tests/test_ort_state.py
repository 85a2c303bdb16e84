"""The ``ort`` runtime's state handling: parameters in swapped buffers, AdamW moments in place.

Moments are updated in place (new.m.<p> is bound to m.<p>'s buffer); these tests pin
what that must not break: the update itself (against a run that keeps every step's
state apart), gradients() leaving the state alone, and a diverged step keeping the
parameters, refusing to go on, and resuming cleanly from a checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest

import runtimes
from runtimes.errors import TrainingDiverged

B, T = 2, 8


def batch(vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(B, T + 1), dtype=np.int64)
    pos = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()
    return ids[:, :-1].copy(), pos, ids[:, 1:].copy()


def snapshot(rt):
    m, v = rt.moments()
    return rt.parameters(), m, v


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_in_place_moments_match_a_step_with_separate_outputs(tiny_index):
    """Three steps through the runtime equal three plain session runs whose outputs are fresh arrays."""
    from runtimes.ort_env import import_onnxruntime

    ort = import_onnxruntime()
    rt = runtimes.load(tiny_index, runtime="ort")
    vocab = rt.art.config["vocab"]
    sess = ort.InferenceSession(str(tiny_index / "train_step.onnx"), providers=["CPUExecutionProvider"])
    p, m, v = snapshot(rt)
    names = list(p)
    for t in range(1, 4):
        tok, pos, lab = batch(vocab, t)
        hp = runtimes.make_hp(1e-2, step=t)
        loss = rt.step(tok, pos, lab, hp)
        feeds = {**p, **{f"m.{n}": m[n] for n in names}, **{f"v.{n}": v[n] for n in names},
                 "tokens": tok, "positions": pos, "labels": lab, "hp": hp, "clip": np.array(0.0, np.float32)}
        out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        p = {n: out[f"new.{n}"] for n in names}
        m = {n: out[f"new.m.{n}"] for n in names}
        v = {n: out[f"new.v.{n}"] for n in names}
        assert loss == float(out["loss"])
    got_p, got_m, got_v = snapshot(rt)
    assert same(got_p, p) and same(got_m, m) and same(got_v, v)


def test_gradients_leave_parameters_and_moments_alone(tiny_index):
    a, b = runtimes.load(tiny_index, runtime="ort"), runtimes.load(tiny_index, runtime="ort")
    vocab = a.art.config["vocab"]
    for t in (1, 2):
        for rt in (a, b):
            rt.step(*batch(vocab, t), runtimes.make_hp(1e-2, step=t))
    before = snapshot(a)
    g = a.gradients(*batch(vocab, 9))
    assert any(np.any(x != 0) for x in g.values())
    assert all(same(x, y) for x, y in zip(before, snapshot(a)))
    la = a.step(*batch(vocab, 3), runtimes.make_hp(1e-2, step=3))
    lb = b.step(*batch(vocab, 3), runtimes.make_hp(1e-2, step=3))
    assert la == lb and all(same(x, y) for x, y in zip(snapshot(a), snapshot(b)))


def _swap_folder(tiny_index, tmp_path):
    """A copy of tiny whose manifest does not allow in-place updates (as folders built before
    the builder checked for it): the runtime keeps a spare parameter set and swaps."""
    import json
    import shutil

    folder = tmp_path / "swap"
    shutil.copytree(tiny_index, folder)
    m = json.loads((folder / "manifest.json").read_text())
    del m["train_step"]["in_place"]
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder


def test_in_place_and_swapped_parameters_train_identically(tiny_index, tmp_path):
    """The builder found every reader of a weight runs before its update is written, so the
    runtime writes new parameters over the old ones; bit for bit what a spare set gives,
    through train_step.onnx and through grad_step + apply_step."""
    assert runtimes.load(tiny_index, runtime="ort").art.manifest["train_step"]["in_place"] is True
    a = runtimes.load(tiny_index, runtime="ort", threads=2)
    b = runtimes.load(_swap_folder(tiny_index, tmp_path), runtime="ort", threads=2)
    assert a._in_place and not b._in_place
    vocab = a.art.config["vocab"]
    for t in range(1, 5):
        hp = runtimes.make_hp(1e-2, step=t)
        la = a.step(*batch(vocab, t), hp) if t % 2 else a.step_accumulated([batch(vocab, t), batch(vocab, 10 + t)], hp)
        lb = b.step(*batch(vocab, t), hp) if t % 2 else b.step_accumulated([batch(vocab, t), batch(vocab, 10 + t)], hp)
        assert la == lb
    assert all(same(x, y) for x, y in zip(snapshot(a), snapshot(b)))


@pytest.mark.parametrize("in_place", [True, False])
def test_diverged_step_refuses_more_and_resumes(tiny_index, tmp_path, in_place):
    """lr 1e30 at step 2 throws the parameters to ~1e30 (finite); step 3's loss overflows.
    With a spare set the parameters stay at step 2; in place they took the update too."""
    folder = tiny_index if in_place else _swap_folder(tiny_index, tmp_path)
    rt = runtimes.load(folder, runtime="ort")
    vocab = rt.art.config["vocab"]
    rt.step(*batch(vocab, 1), runtimes.make_hp(1e-2, step=1))
    ckpt = tmp_path / "ckpt.safetensors"
    rt.save(ckpt)
    good = snapshot(rt)
    rt.step(*batch(vocab, 2), runtimes.make_hp(1e30, step=2))
    params, m, v = snapshot(rt)
    said = (r"its update was written in place over the parameters and the AdamW moments" if in_place else
            r"the update was not applied to the parameters \(they stay at step 2\), but the AdamW moments were "
            r"updated in place")
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3; " + said):
        rt.step(*batch(vocab, 3), runtimes.make_hp(1e30, step=3))
    assert rt.step_count == 2
    if in_place:
        with pytest.raises(TrainingDiverged, match=r"step 3 diverged and its in-place parameters and AdamW moments"):
            rt.parameters()
    else:
        assert same(rt.parameters(), params)
        assert not same(rt.moments()[1], v)  # written in place: the documented cost of keeping one set
    with pytest.raises(TrainingDiverged, match=r"step 3 diverged.*continue from a checkpoint"):
        rt.step(*batch(vocab, 3), runtimes.make_hp(1e-3, step=3))
    with pytest.raises(TrainingDiverged, match=r"step 3 diverged"):
        rt.save(tmp_path / "half-applied.safetensors")
    assert not (tmp_path / "half-applied.safetensors").exists()
    again = runtimes.resume(ckpt)
    assert again.step_count == 1 and all(same(x, y) for x, y in zip(snapshot(again), good))
    assert np.isfinite(again.step(*batch(vocab, 2), runtimes.make_hp(1e-2, step=2)))
