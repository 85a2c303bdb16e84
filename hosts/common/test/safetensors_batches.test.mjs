import assert from 'node:assert/strict';
import { test } from 'node:test';

import { BATCH_FORMAT, readBatches } from '../batches.mjs';
import { encodeSafetensors, parseSafetensors } from '../safetensors.mjs';

class DataError extends Error {}

test('safetensors round trip: dtypes, shapes, metadata, 8-byte aligned header', () => {
  const bytes = encodeSafetensors({
    w: { data: Float32Array.of(1.5, -2, 3, 4, 5, 6), shape: [2, 3] },
    i: { data: BigInt64Array.of(-1n, 2n ** 40n), shape: [2] },
  }, { step: '3' });
  assert.ok(bytes instanceof Uint8Array);
  const hlen = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  assert.equal(hlen % 8, 0);
  const { tensors, metadata } = parseSafetensors(bytes);
  assert.deepEqual(metadata, { step: '3' });
  assert.deepEqual(Object.keys(tensors).sort(), ['i', 'w']);
  assert.deepEqual(tensors.w.shape, [2, 3]);
  assert.deepEqual(Array.from(tensors.w.data), [1.5, -2, 3, 4, 5, 6]);
  assert.deepEqual(Array.from(tensors.i.data), [-1n, 2n ** 40n]);
  // from an ArrayBuffer, and from a view into a larger buffer (as a Node Buffer from the pool is)
  assert.deepEqual(Object.keys(parseSafetensors(bytes.buffer).tensors).sort(), ['i', 'w']);
  const pooled = new Uint8Array(bytes.length + 13);
  pooled.set(bytes, 13);
  assert.deepEqual(Array.from(parseSafetensors(pooled.subarray(13)).tensors.w.data), [1.5, -2, 3, 4, 5, 6]);
  if (globalThis.Buffer) {
    const buf = Buffer.concat([Buffer.alloc(5), Buffer.from(bytes)]).subarray(5);
    assert.deepEqual(Array.from(parseSafetensors(buf).tensors.i.data), [-1n, 2n ** 40n]);
  }
});

test('safetensors: damaged files are refused with the given error class', () => {
  const good = encodeSafetensors({ w: { data: Float32Array.of(1, 2), shape: [2] } });
  const cases = [
    [good.subarray(0, 4), 'too short'],
    [good.subarray(0, good.length - 1), 'truncated'],
    [Uint8Array.of(255, 255, 255, 255, 0, 0, 0, 0, 1), 'does not fit'],
  ];
  for (const [bytes, needle] of cases) {
    assert.throws(() => parseSafetensors(bytes, 'f.st', DataError), (e) => e instanceof DataError && e.message.startsWith('f.st: ') && e.message.includes(needle));
  }
  assert.throws(() => encodeSafetensors({ w: { data: [1, 2], shape: [2] } }, undefined, DataError), DataError);
  assert.throws(() => encodeSafetensors({}, { step: 3 }), /metadata step must be a string/);
});

const config = { vocab: 10, context: 4, labels: 'index' };
const ids = (n) => Array.from({ length: n }, (_, i) => i % 4);

function jsonBatches(extra = {}) {
  return { format: BATCH_FORMAT, version: 1, shape: [2, 1, 4], hp: { lr: 0.01 }, tokens: ids(8), positions: ids(8), labels: ids(8), ...extra };
}

test('readBatches: JSON and safetensors forms give the same batches', () => {
  const fromJson = readBatches(jsonBatches(), config, 'b.json');
  const i64 = (a) => ({ data: BigInt64Array.from(a, BigInt), shape: [2, 1, 4] });
  const st = encodeSafetensors({ tokens: i64(ids(8)), positions: i64(ids(8)), labels: i64(ids(8)) },
    { format: BATCH_FORMAT, format_version: '1', lr: '0.01', config: JSON.stringify({ vocab: 10 }) });
  const fromSt = readBatches(st, config, 'b.st');
  for (const r of [fromJson, fromSt]) {
    assert.equal(r.n, 2);
    assert.deepEqual(r.hp, { lr: 0.01 });
    const b = r.get(1);
    assert.deepEqual(b.tokens.dims, [1, 4]);
    assert.deepEqual(Array.from(b.labels.data), [0n, 1n, 2n, 3n]);
  }
});

test('readBatches: refusals name the file and the value', () => {
  const refuse = (src, needle) => assert.throws(() => readBatches(src, config, 'b.json', DataError),
    (e) => e instanceof DataError && e.message.includes(needle), needle);
  refuse(jsonBatches({ version: 2 }), 'format/version');
  refuse(jsonBatches({ config: { vocab: 11 } }), 'b.json was written for artifacts with vocab=11, but manifest.json says vocab=10');
  refuse(jsonBatches({ shape: [1, 1, 8], tokens: ids(8), positions: ids(8), labels: ids(8) }), 'sequence length T=8 exceeds');
  refuse(jsonBatches({ tokens: [...ids(7), 10] }), 'tokens[1, 0, 3] = 10 is out of range: token ids must be in [0, 10)');
  refuse(jsonBatches({ hp: { lr: -1 } }), 'b.json hp: lr must be >= 0');
});
