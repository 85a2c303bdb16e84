import assert from 'node:assert/strict';
import { test } from 'node:test';

import { HP_LAYOUT } from '../contract.mjs';
import { ADAMW_KEYS, checkAdamW, checkClip, checkHp, makeHp } from '../hp.mjs';
import doc from '../../../contract/vectors/hp.json' with { type: 'json' };

const args = (c) => [c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, c.step];
const bits = (hp) => Array.from(new Uint32Array(hp.buffer, hp.byteOffset, hp.length));

class VectorError extends Error {}

for (const c of doc.cases) {
  test(`makeHp bit pattern at t=${c.step}`, () => {
    const hp = makeHp(...args(c));
    assert.ok(hp instanceof Float32Array && hp.length === HP_LAYOUT.length);
    assert.deepEqual(bits(hp), c.hp_bits);
    assert.equal(checkHp(hp, c.step), hp); // what makeHp builds, checkHp accepts
  });
}

for (const c of doc.errors) {
  test(`makeHp refuses ${c.error_names} (${JSON.stringify(args(c))})`, () => {
    assert.throws(() => makeHp(...args(c), VectorError), (e) => e instanceof VectorError && e.message.includes(c.error_names));
  });
}

test('makeHp defaults: beta1 0.9, beta2 0.999, eps 1e-8, weight_decay 0.01, t 1', () => {
  assert.deepEqual(bits(makeHp(0.001)), doc.cases.find((c) => c.step === 1 && c.lr === 0.001).hp_bits);
});

test('checkHp refuses a vector built for another step', () => {
  const hp = makeHp(1e-3, 0.9, 0.999, 1e-8, 0.01, 2);
  assert.throws(() => checkHp(hp, 3, VectorError), (e) => e instanceof VectorError && /hp\[5\] \(beta1h\).*t=3/.test(e.message));
  assert.throws(() => checkHp(Array.from(hp), 2), /Float32Array/);
  assert.throws(() => checkHp(hp.subarray(0, 6), 2), /length 7/);
});

test('checkAdamW: numbers or decimal strings, checked; absent ones optional on request', () => {
  const given = Object.fromEntries(ADAMW_KEYS.map((k, i) => [k, String([0.002, 0.9, 0.95, 1e-8, 0.1][i])]));
  assert.deepEqual(Object.values(checkAdamW(given, 'here')), [0.002, 0.9, 0.95, 1e-8, 0.1]);
  assert.throws(() => checkAdamW({ ...given, eps: '0' }, 'here', VectorError), (e) => e instanceof VectorError && e.message === 'here: eps must be > 0, got 0');
  assert.throws(() => checkAdamW({ ...given, lr: 'x' }, 'here'), /here: lr is "x", expected a finite number/);
  assert.throws(() => checkAdamW({}, 'here'), /here: lr is undefined/);
  assert.deepEqual(checkAdamW({ lr: '0.5' }, 'here', Error, { required: false }), { lr: 0.5 });
});

test('checkClip: numbers >= 0 as float32; 0 and Infinity are off', () => {
  assert.equal(checkClip(0.1), Math.fround(0.1));
  assert.equal(checkClip(Infinity), Infinity);
  for (const bad of [-1, NaN, '1', null]) assert.throws(() => checkClip(bad, VectorError), VectorError);
});
