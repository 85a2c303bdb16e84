import assert from 'node:assert/strict';
import { test } from 'node:test';

import { denseLabels } from '../batches.mjs';
import { byteSampler, mulberry32, randomSampler } from '../samplers.mjs';
import doc from '../../../contract/vectors/samplers.json' with { type: 'json' };

/** The vectors' text: bytes 32..126, three times. */
function vectorText(c) {
  const one = Array.from({ length: 127 - 32 }, (_, i) => 32 + i);
  const text = Uint8Array.from([...one, ...one, ...one]);
  assert.equal(text.length, c.text_bytes);
  return text;
}

for (const c of doc.mulberry32) {
  test(`mulberry32(${c.seed}) first values`, () => {
    const rand = mulberry32(c.seed);
    assert.deepEqual(c.first.map(() => rand()), c.first);
  });
}

for (const c of doc.byte_sampler) {
  test(`byteSampler offsets, B=${c.batch} T=${c.seq} seed ${c.seed}`, () => {
    const text = vectorText(c);
    const next = byteSampler(text, c.batch, c.seq, c.seed);
    for (const want of c.offsets) {
      const b = next();
      assert.deepEqual(b.offsets, want);
      assert.deepEqual(b.tokens.dims, [c.batch, c.seq]);
      want.forEach((o, r) => {
        const row = (x) => Array.from(x.data.subarray(r * c.seq, (r + 1) * c.seq), Number);
        assert.deepEqual(row(b.tokens), Array.from(text.subarray(o, o + c.seq)));
        assert.deepEqual(row(b.labels), Array.from(text.subarray(o + 1, o + c.seq + 1)));
        assert.deepEqual(row(b.positions), Array.from({ length: c.seq }, (_, j) => j));
      });
    }
  });
}

test('byteSampler refuses a text shorter than T+1', () => {
  class E extends Error {}
  assert.throws(() => byteSampler(new Uint8Array(8), 1, 8, 0, E), (e) => e instanceof E && e.message.includes('needs at least T+1 = 9'));
});

test('randomSampler: ids in range, labels are the next id of the row', () => {
  const b = randomSampler(50, 3, 5, 1)();
  assert.deepEqual(b.labels.dims, [3, 5]);
  for (let r = 0; r < 3; r++) {
    for (let j = 0; j < 4; j++) assert.equal(b.labels.data[r * 5 + j], b.tokens.data[r * 5 + j + 1]);
  }
  assert.ok(Array.from(b.tokens.data).every((x) => x >= 0n && x < 50n));
});

test('denseLabels: one-hot rows, dims + [vocab]; ids out of range refused', () => {
  const d = denseLabels({ data: BigInt64Array.of(2n, 0n), dims: [1, 2] }, 3);
  assert.deepEqual(d.dims, [1, 2, 3]);
  assert.deepEqual(Array.from(d.data), [0, 0, 1, 1, 0, 0]);
  assert.throws(() => denseLabels({ data: [0, 3], dims: [1, 2] }, 3), /labels\[0, 1\] = 3 is out of range/);
});
