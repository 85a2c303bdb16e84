"""runtimes/data.py: tokenizer, corpora, split, resumable batch sampler, labels."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtimes import data
from runtimes.errors import DataError, GPT2OnnxError, InputError


# -------------------------------------------------------------------- tokenizer
@given(st.text())
@settings(max_examples=100, deadline=None)
def test_tokenizer_round_trip_text(text):
    ids = data.encode(text)
    assert ids.dtype == np.uint8 and ids.ndim == 1
    assert data.decode(ids) == text
    assert data.decode(data.encode(text, dtype=np.int64)) == text


@given(st.binary())
@settings(max_examples=100, deadline=None)
def test_tokenizer_bytes_are_ids(raw):
    ids = data.encode(raw, dtype=np.int64)
    assert ids.dtype == np.int64
    assert ids.tolist() == list(raw)
    assert data.decode(ids) == raw.decode("utf-8", errors="replace")


def test_tokenizer_details():
    assert data.encode("é").tolist() == [0xC3, 0xA9]
    assert data.decode([0xFF, 0x41]) == "\ufffdA"
    assert data.decode(np.array([[104, 105]])) == "hi"
    assert data.decode([]) == ""
    tok = data.ByteTokenizer()
    assert tok.vocab_size == data.VOCAB_SIZE == 256
    assert tok.decode(tok.encode("héllo")) == "héllo"
    with pytest.raises(InputError, match="256"):
        data.decode([1, 256])
    with pytest.raises(InputError, match="-1"):
        data.decode(np.array([-1, 3]))
    with pytest.raises(InputError, match="float"):
        data.decode(np.array([1.0]))
    with pytest.raises(InputError, match="int"):
        data.encode(12)
    with pytest.raises(InputError, match="int8"):
        data.encode("a", dtype=np.int8)


def test_module_needs_neither_torch_nor_graphgen():
    code = (
        "import sys, runtimes.data as d; d.BatchSampler(d.encode('abcdefgh'), 2, 3, 0).next();"
        "bad = [m for m in ('torch', 'graphgen', 'onnx', 'onnxruntime') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------- corpus
def test_default_corpus_is_large_deterministic_and_capped():
    text = data.default_corpus()
    size = len(text.encode("utf-8"))
    assert 1024 * 1024 <= size <= data.DEFAULT_CORPUS_MAX_BYTES
    assert "def " in text and "import " in text
    data._default_corpus.cache_clear()
    assert data.default_corpus() == text  # recomputed from disk: same text
    small = data.default_corpus(max_bytes=200_000)
    assert 0 < len(small.encode("utf-8")) <= 200_000
    assert text.startswith(small)  # whole files, same order
    tokens = data.load_tokens()
    assert tokens.dtype == np.uint8 and tokens.size == size


def test_default_corpus_files_skip_tests_and_are_sorted():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    relative = [f.relative_to(stdlib).as_posix() for f in data.stdlib_source_files()]
    assert relative == sorted(relative) and len(relative) > 100
    assert all(r.endswith(".py") for r in relative)
    for skipped in ("test", "tests", "idlelib", "site-packages", "__pycache__"):
        assert not any(skipped in r.split("/")[:-1] for r in relative), skipped
    with pytest.raises(DataError, match="max_bytes"):
        data.default_corpus(max_bytes=0)
    with pytest.raises(DataError, match="does not exist"):
        data.stdlib_source_files("/nonexistent/stdlib")


def test_load_corpus_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("BBB\n", encoding="utf-8")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "z.txt").write_bytes(b"Z\xffZ\n")  # invalid UTF-8 is replaced
    (tmp_path / "a" / "c.txt").write_text("CCé\n", encoding="utf-8")
    (tmp_path / ".hidden").write_text("never", encoding="utf-8")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x").write_text("never", encoding="utf-8")
    assert data.load_corpus(tmp_path) == "CCé\nZ\ufffdZ\nBBB\n"
    assert data.load_corpus(str(tmp_path / "b.txt")) == "BBB\n"
    assert [p.name for p in data.corpus_files(tmp_path)] == ["c.txt", "z.txt", "b.txt"]
    assert data.load_tokens(tmp_path / "b.txt").tolist() == list(b"BBB\n")


def test_load_corpus_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="nope.txt.*does not exist"):
        data.load_corpus(missing)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty.txt.*empty"):
        data.load_corpus(tmp_path / "empty.txt")
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="no files"):
        data.load_corpus(tmp_path / "dir")
    (tmp_path / "dir2").mkdir()
    (tmp_path / "dir2" / "e").write_bytes(b"")
    with pytest.raises(DataError, match="0 bytes in 1 file"):
        data.load_corpus(tmp_path / "dir2")
    # every error is catchable as the package's base class and as ValueError
    with pytest.raises(GPT2OnnxError):
        data.load_corpus(missing)
    with pytest.raises(ValueError):
        data.load_corpus(missing)


# ------------------------------------------------------------------------ split
def test_split_is_disjoint_contiguous_and_deterministic():
    tokens = np.arange(1000, dtype=np.int64)
    train, val = data.train_val_split(tokens)
    assert len(val) == 50 and len(train) == 950
    assert np.array_equal(np.concatenate([train, val]), tokens)
    assert set(train.tolist()).isdisjoint(val.tolist())
    train2, val2 = data.train_val_split(tokens.copy())
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    t, v = data.train_val_split(np.arange(10), val_fraction=0.01)
    assert len(v) == 1 and len(t) == 9  # at least one validation token
    t, v = data.train_val_split(np.arange(10), val_fraction=0.0)
    assert len(v) == 0 and len(t) == 10
    corpus = data.load_tokens(max_bytes=300_000)
    tr, va = data.train_val_split(corpus)
    assert len(tr) + len(va) == len(corpus) and abs(len(va) - 0.05 * len(corpus)) <= 1


def test_split_errors():
    for bad in (-0.1, 1.0, 1.5, "0.1", True):
        with pytest.raises(DataError, match="val_fraction"):
            data.train_val_split(np.arange(100), val_fraction=bad)
    with pytest.raises(DataError, match="nothing would be left"):
        data.train_val_split(np.arange(1), val_fraction=0.5)
    with pytest.raises(DataError, match="1-D"):
        data.train_val_split(np.zeros((2, 2), np.int64))


# ---------------------------------------------------------------------- batches
def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, w in zip(x, y):
            np.testing.assert_array_equal(u, w)


def test_batch_shapes_positions_and_shifted_labels():
    tokens = np.arange(500, dtype=np.int64)  # token value == its offset
    s = data.BatchSampler(tokens, batch=4, seq_len=7, seed=3)
    for _ in range(20):
        tok, pos, lab = s.next()
        for arr in (tok, pos, lab):
            assert arr.dtype == np.int64 and arr.shape == (4, 7) and arr.flags.c_contiguous
        assert np.array_equal(pos, np.broadcast_to(np.arange(7), (4, 7)))
        assert np.array_equal(lab[:, :-1], tok[:, 1:])
        assert np.array_equal(lab, tok + 1)  # the next token of the data, not just a shift
        assert np.array_equal(tok, tok[:, :1] + np.arange(7))  # contiguous windows
        assert tok.min() >= 0 and lab.max() <= 499
    assert s.batches_drawn == 20
    # real text: labels are the next bytes of the corpus
    corpus = data.encode("hello world, " * 20)
    tok, _, lab = data.BatchSampler(corpus, 2, 5, seed=0).next()
    assert np.array_equal(tok[:, 1:], lab[:, :-1])


def test_every_offset_is_reachable():
    tokens = np.arange(9, dtype=np.int64)  # T=6: offsets 0, 1, 2
    s = data.BatchSampler(tokens, batch=16, seq_len=6, seed=0)
    starts = set()
    for _ in range(10):
        starts.update(s.next()[0][:, 0].tolist())
    assert starts == {0, 1, 2}
    # exactly T+1 tokens: one possible window
    tok, _, lab = data.BatchSampler(np.arange(7), batch=3, seq_len=6, seed=5).next()
    assert np.array_equal(tok, np.tile(np.arange(6), (3, 1)))
    assert np.array_equal(lab, np.tile(np.arange(1, 7), (3, 1)))


def test_sampler_determinism_by_seed():
    tokens = data.encode("the quick brown fox jumps over the lazy dog. " * 50)
    a = data.fixed_batches(tokens, 3, 16, 5, seed=7)
    b = data.fixed_batches(tokens, 3, 16, 5, seed=7)
    _assert_batches_equal(a, b)
    c = data.fixed_batches(tokens, 3, 16, 5, seed=8)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))
    s = data.BatchSampler(tokens, 3, 16, seed=7)
    _assert_batches_equal(a, [next(s) for _ in range(5)])
    assert data.fixed_batches(tokens, 3, 16, 0) == []


@pytest.mark.parametrize("through_json", [False, True])
def test_state_dict_resumes_exactly(through_json):
    tokens = data.encode("abcdefghijklmnopqrstuvwxyz0123456789" * 30)
    uninterrupted = data.BatchSampler(tokens, 4, 10, seed=11)
    expected = [uninterrupted.next() for _ in range(12)]

    first = data.BatchSampler(tokens, 4, 10, seed=11)
    got = [first.next() for _ in range(5)]
    state = first.state_dict()
    if through_json:
        state = json.loads(json.dumps(state))
    assert state["batches_drawn"] == 5
    first.next()  # drawing more afterwards does not alter the saved state
    # a new sampler (its seed does not matter), possibly already used, resumes exactly
    resumed = data.BatchSampler(tokens.copy(), 4, 10, seed=999)
    resumed.next()
    resumed.load_state_dict(state)
    assert resumed.batches_drawn == 5 and resumed.seed == 11
    got += [resumed.next() for _ in range(7)]
    _assert_batches_equal(got, expected)
    assert resumed.state_dict() == json.loads(json.dumps(uninterrupted.state_dict()))


def test_state_dict_is_plain_json_with_no_big_numbers():
    s = data.BatchSampler(np.arange(100), 2, 5, seed=1)
    s.next()
    state = s.state_dict()

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, int):
            assert abs(x) < 2**53  # safe in any JSON reader, JavaScript's included
        else:
            assert isinstance(x, (str, float, type(None))), type(x)

    walk(state)
    assert json.loads(json.dumps(state)) == state


def test_load_state_dict_rejects_mismatches():
    tokens = np.arange(200)
    s = data.BatchSampler(tokens, 2, 5, seed=1)
    s.next()
    state = s.state_dict()
    with pytest.raises(DataError, match="batch=2.*batch=3"):
        data.BatchSampler(tokens, 3, 5).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len"):
        data.BatchSampler(tokens, 2, 6).load_state_dict(state)
    with pytest.raises(DataError, match="n_tokens"):
        data.BatchSampler(tokens[:150], 2, 5).load_state_dict(state)
    with pytest.raises(DataError, match="other data"):
        data.BatchSampler(tokens[::-1].copy(), 2, 5).load_state_dict(state)
    target = data.BatchSampler(tokens, 2, 5, seed=4)
    before = target.state_dict()
    for breakage in (
        lambda d: d.pop("rng"),
        lambda d: d.update(version=99),
        lambda d: d.update(batches_drawn=-1),
        lambda d: d["rng"].update(bit_generator="MT19937"),
        lambda d: d["rng"]["state"].update(state="not a number"),
    ):
        bad = json.loads(json.dumps(state))
        breakage(bad)
        with pytest.raises(DataError, match="sampler state"):
            target.load_state_dict(bad)
        assert target.state_dict() == before  # nothing changed
    with pytest.raises(DataError, match="dict"):
        target.load_state_dict([1, 2])


def test_sampler_errors_name_the_data_and_sizes():
    with pytest.raises(DataError, match=r"corpus\.txt holds 0 tokens.*T\+1 = 9"):
        data.BatchSampler(np.array([], dtype=np.uint8), 2, 8, name="corpus.txt")
    with pytest.raises(DataError, match=r"holds 8 tokens.*T=8.*at least T\+1 = 9"):
        data.BatchSampler(np.arange(8), 2, 8)
    with pytest.raises(DataError, match="holds 0 tokens"):
        data.BatchSampler([], 1, 1)
    for b in (0, -1, 1.5, True):
        with pytest.raises(DataError, match="batch size B"):
            data.BatchSampler(np.arange(100), b, 4)
    for t in (0, -3, 2.0):
        with pytest.raises(DataError, match="sequence length T"):
            data.BatchSampler(np.arange(100), 2, t)
    with pytest.raises(DataError, match="seed"):
        data.BatchSampler(np.arange(100), 2, 4, seed=-1)
    with pytest.raises(DataError, match="1-D"):
        data.BatchSampler(np.zeros((10, 10), np.int64), 2, 4)
    with pytest.raises(DataError, match="integer"):
        data.BatchSampler(np.zeros(10), 2, 4)
    with pytest.raises(DataError, match=r"\[0, 50\).*\[0, 99\]"):
        data.BatchSampler(np.arange(100), 2, 4, vocab=50)
    with pytest.raises(DataError, match=r"-5"):
        data.BatchSampler(np.arange(-5, 10), 2, 4)
    with pytest.raises(DataError, match="number of batches"):
        data.fixed_batches(np.arange(100), 2, 4, -1)
    with pytest.raises(DataError, match="holds 3 tokens"):
        data.fixed_batches(np.arange(3), 2, 4, 1)


# ----------------------------------------------------------------- dense labels
def test_dense_labels_one_hot():
    labels = np.array([[0, 3, 255], [7, 7, 1]], dtype=np.int64)
    dense = data.dense_labels(labels, 256)
    assert dense.dtype == np.float32 and dense.shape == (2, 3, 256)
    assert np.array_equal(dense.argmax(-1), labels)
    assert np.all(dense.sum(-1) == 1.0) and set(np.unique(dense).tolist()) == {0.0, 1.0}
    assert data.dense_labels(np.array([[1]]), 4).tolist() == [[[0.0, 1.0, 0.0, 0.0]]]
    _, _, lab = data.BatchSampler(np.arange(100) % 13, 2, 5, seed=0).next()
    assert np.array_equal(data.dense_labels(lab, 13).argmax(-1), lab)
    with pytest.raises(InputError, match=r"\[0, 4\).*\[1, 9\]"):
        data.dense_labels(np.array([[1, 9]]), 4)
    with pytest.raises(InputError, match="vocab"):
        data.dense_labels(np.array([[1]]), 0)
    with pytest.raises(InputError, match="integer"):
        data.dense_labels(np.array([[1.0]]), 4)
