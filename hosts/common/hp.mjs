// The hyperparameter vector train_step.onnx reads (contract: hp, float32[7]) and the clipping
// threshold: makeHp builds the vector for update t, checkHp checks one a caller built,
// checkAdamW checks the five numbers a user or a batch file gave, checkClip the threshold.
// Held to contract/vectors/hp.json, as contract/hp.py is.
//
// Checks throw `new Err(message)`: Err defaults to Error; hosts/node passes its own classes.

import { HP_LAYOUT, HP_RTOL } from './contract.mjs';
import { show } from './util.mjs';

/** The five values a caller chooses: the hp layout without the two bias corrections. */
export const ADAMW_KEYS = HP_LAYOUT.slice(0, 5);

// name -> [allowed, what the message says]
const RANGES = new Map([
  [ADAMW_KEYS[0], [(v) => v >= 0, 'must be >= 0']],
  [ADAMW_KEYS[1], [(v) => v >= 0 && v < 1, 'must be in [0, 1)']],
  [ADAMW_KEYS[2], [(v) => v >= 0 && v < 1, 'must be in [0, 1)']],
  [ADAMW_KEYS[3], [(v) => v > 0, 'must be > 0']],
  [ADAMW_KEYS[4], [(v) => v >= 0, 'must be >= 0']],
]);

/** The range of one of the five AdamW values; `label` names it in the message. */
function checkRange(key, value, label, Err) {
  const [ok, rule] = RANGES.get(key);
  if (!ok(value)) throw new Err(`${label} ${rule}, got ${value}`);
}

/**
 * float32[7] for update number t (t >= 1): [lr, beta1, beta2, eps, weight_decay,
 * 1/(1-beta1^t), 1/(1-beta2^t)], the corrections computed in float64 from the float32 betas
 * the vector carries and rounded to float32, as contract/hp.py make_hp. Values out of range
 * (including a beta that rounds to 1 in float32) are refused.
 */
export function makeHp(lr, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weightDecay = 0.01, t = 1, Err = Error) {
  if (!Number.isInteger(t) || t < 1) throw new Err(`step t must be an integer >= 1 (t counts from 1), got ${t}`);
  const values = [lr, beta1, beta2, eps, weightDecay];
  values.forEach((x, i) => {
    if (typeof x !== 'number' || !Number.isFinite(x)) throw new Err(`${ADAMW_KEYS[i]} must be a finite number, got ${show(x)}`);
    checkRange(ADAMW_KEYS[i], x, ADAMW_KEYS[i], Err);
  });
  // With the decimal betas instead, 1/(1 - 0.999) against the graph's 1 - float32(0.999)
  // would bias every first update by 6.7e-6 relative.
  const b1 = Math.fround(beta1), b2 = Math.fround(beta2);
  [b1, b2].forEach((b, i) => {
    if (!(b < 1)) throw new Err(`${ADAMW_KEYS[i + 1]} = ${values[i + 1]} becomes ${b} in float32, outside its range [0, 1)`);
  });
  const b1h = b1 > 0 ? 1 / (1 - b1 ** t) : 1;
  const b2h = b2 > 0 ? 1 / (1 - b2 ** t) : 1;
  const hp = Float32Array.of(lr, beta1, beta2, eps, weightDecay, b1h, b2h);
  hp.forEach((x, i) => {
    // float32 rounding: 1e39 -> Infinity, 1e-50 -> 0
    if (!Number.isFinite(x) || (i === 3 && !(x > 0))) {
      throw new Err(`${HP_LAYOUT[i]} = ${i < 5 ? values[i] : [b1h, b2h][i - 5]} becomes ${x} in float32, outside its range`);
    }
  });
  return hp;
}

/** Check hp (a Float32Array built for update number t, e.g. by makeHp); returns it. */
export function checkHp(hp, t, Err = Error) {
  if (!(hp instanceof Float32Array)) throw new Err(`hp must be a Float32Array of ${HP_LAYOUT.length} (use makeHp), got ${hp?.constructor?.name ?? typeof hp}`);
  if (hp.length !== HP_LAYOUT.length) throw new Err(`hp must have length ${HP_LAYOUT.length} [${HP_LAYOUT}], got ${hp.length}`);
  hp.forEach((x, i) => {
    if (!Number.isFinite(x)) throw new Err(`hp[${i}] (${HP_LAYOUT[i]}) must be finite, got ${x}`);
  });
  ADAMW_KEYS.forEach((key, i) => checkRange(key, hp[i], `hp[${i}] (${key})`, Err));
  const want = makeHp(hp[0], hp[1], hp[2], hp[3], hp[4], t, Err);
  for (const i of [5, 6]) {
    if (Math.abs(hp[i] - want[i]) > HP_RTOL * want[i]) {
      throw new Err(
        `hp[${i}] (${HP_LAYOUT[i]}) = ${hp[i]} disagrees with step t=${t}: expected 1/(1-${HP_LAYOUT[i - 4]}^${t}) = ${want[i]} ` +
          `(build hp with makeHp(..., ${t}))`,
      );
    }
  }
  return hp;
}

/**
 * Check the five AdamW values a user or a batch file gave ({lr, beta1, ...}, numbers or
 * decimal strings); returns them as numbers. `where` names their source in messages. With
 * required false, absent values stay undefined (the caller supplies defaults).
 */
export function checkAdamW(values, where, Err = Error, { required = true } = {}) {
  const out = {};
  for (const k of ADAMW_KEYS) {
    const raw = values[k];
    if (!required && raw === undefined) continue;
    const v = Number(raw);
    if (raw === undefined || raw === null || raw === '' || typeof raw === 'boolean' || !Number.isFinite(v)) {
      throw new Err(`${where}: ${k} is ${show(raw)}, expected a finite number`);
    }
    checkRange(k, v, `${where}: ${k}`, Err);
    out[k] = v;
  }
  return out;
}

/**
 * The global gradient-norm clipping threshold train_step.onnx reads as a float32 scalar: a number
 * >= 0, where 0 and Infinity turn clipping off (as contract/hp.py check_clip). Throws for anything else.
 */
export function checkClip(clip, Err = Error) {
  if (typeof clip !== 'number' || Number.isNaN(clip) || clip < 0) {
    throw new Err(`clip must be a number >= 0 (0 or Infinity: off), got ${JSON.stringify(clip) ?? String(clip)}`);
  }
  return Math.fround(clip);
}
