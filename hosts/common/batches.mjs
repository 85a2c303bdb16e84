// Batch files (what `python -m runtimes.batchfile` writes, or the page's JSON form) and the
// one shape a batch has in both hosts: {tokens, positions, labels}, each {data, dims} with
// data a BigInt64Array of B*T ids and dims [B, T] (dense labels: Float32Array, [B, T, vocab]).
//
// Checks throw `new Err(message)`: Err defaults to Error; hosts/node passes its own classes.

import { checkAdamW } from './hp.mjs';
import { parseSafetensors } from './safetensors.mjs';
import { isObject, numel, sameShape, show, unravel } from './util.mjs';

export const BATCH_FORMAT = 'gpt2-onnx-batches';
/** The batch-file version these hosts read: JSON "version", safetensors metadata "format_version". */
export const BATCH_VERSION = 1;

const KEYS = ['tokens', 'positions', 'labels'];

/**
 * Read a batch file, in one of two forms:
 *  - safetensors bytes (Uint8Array, Buffer or ArrayBuffer) as runtimes/batchfile.py writes
 *    them: I64 tokens/positions/labels (N, B, T); __metadata__ format "gpt2-onnx-batches",
 *    format_version "1", lr/beta1/beta2/eps/weight_decay as decimal strings, config (JSON of
 *    the architecture);
 *  - a parsed JSON object {format: "gpt2-onnx-batches", version: 1, shape: [N, B, T], hp:
 *    {lr, beta1, beta2, eps, weight_decay}, tokens, positions, labels (flat row-major integer
 *    lists), config?}.
 * Checked against the model's config: the recorded config must agree, T must fit the
 * context and every id must be in range. The AdamW values are checked where present and
 * undefined where absent (the caller supplies them).
 * Returns {n, batch, seq, hp, metadata, tokens, positions, labels (flat BigInt64Array of
 * N*B*T), get(i) -> batch i (0-based) as {tokens, positions, labels} of {data, dims}}.
 */
export function readBatches(source, config, what = 'batch file', Err = Error) {
  let n, b, t, hp, metadata = {};
  let recorded; // the config the batches were written for, when the file says
  const data = {};
  if (source instanceof ArrayBuffer || ArrayBuffer.isView(source)) {
    const parsed = parseSafetensors(source, what, Err);
    metadata = parsed.metadata;
    if (metadata.format !== undefined && metadata.format !== BATCH_FORMAT) {
      throw new Err(`${what}: metadata format ${show(metadata.format)} is not ${BATCH_FORMAT}`);
    }
    if (metadata.format_version !== undefined && metadata.format_version !== String(BATCH_VERSION)) {
      throw new Err(`${what}: metadata format_version ${show(metadata.format_version)} is not supported (this host reads "${BATCH_VERSION}")`);
    }
    const { tensors } = parsed;
    for (const key of KEYS) {
      const x = tensors[key];
      if (!x) throw new Err(`${what}: no tensor ${key} (a batch file holds tokens, positions, labels as int64 (N, B, T))`);
      if (x.dtype !== 'I64' || x.shape.length !== 3) throw new Err(`${what}: ${key} is ${x.dtype}${JSON.stringify(x.shape)}, expected I64 (N, B, T)`);
      if (!sameShape(x.shape, tensors.tokens.shape)) {
        throw new Err(`${what}: ${key} shape ${JSON.stringify(x.shape)} differs from tokens shape ${JSON.stringify(tensors.tokens.shape)}`);
      }
      data[key] = x.data;
    }
    [n, b, t] = tensors.tokens.shape;
    hp = checkAdamW(metadata, `${what} metadata`, Err, { required: false });
    if (metadata.config !== undefined) {
      try {
        recorded = JSON.parse(metadata.config);
      } catch (e) {
        throw new Err(`${what}: metadata config is not JSON (${e.message})`);
      }
    }
  } else {
    const js = source;
    if (!isObject(js) || js.format !== BATCH_FORMAT || js.version !== BATCH_VERSION) {
      throw new Err(`${what}: format/version is ${show(js?.format)}/${show(js?.version)}, expected "${BATCH_FORMAT}"/${BATCH_VERSION}`);
    }
    if (!Array.isArray(js.shape) || js.shape.length !== 3 || !js.shape.every((d) => Number.isInteger(d) && d > 0)) {
      throw new Err(`${what}: shape must be [N, B, T] of positive integers, got ${show(js.shape)}`);
    }
    [n, b, t] = js.shape;
    hp = checkAdamW(js.hp ?? {}, `${what} hp`, Err, { required: false });
    recorded = js.config;
    for (const key of KEYS) {
      const a = js[key];
      if (!Array.isArray(a) || a.length !== n * b * t) {
        throw new Err(`${what}: ${key} must be a flat list of N*B*T = ${n * b * t} integers, got ${Array.isArray(a) ? a.length : typeof a}`);
      }
      if (!a.every(Number.isInteger)) throw new Err(`${what}: ${key} holds a value that is not an integer`);
      data[key] = BigInt64Array.from(a, (x) => BigInt(x));
    }
  }
  if (n < 1 || b < 1 || t < 1) throw new Err(`${what}: batch shape [${n}, ${b}, ${t}] is empty`);
  if (recorded !== undefined) {
    if (!isObject(recorded)) throw new Err(`${what}: config is ${show(recorded)}, not an object`);
    for (const [k, v] of Object.entries(recorded)) {
      if (config[k] !== v) {
        throw new Err(`${what} was written for artifacts with ${k}=${show(v)}, but manifest.json says ${k}=${show(config[k])}`);
      }
    }
  }
  if (t > config.context) throw new Err(`${what}: sequence length T=${t} exceeds the artifacts' context ${config.context}`);
  for (const [key, hi, ids] of [['tokens', config.vocab, 'token ids'], ['positions', config.context, 'positions'], ['labels', config.vocab, 'label ids']]) {
    const d = data[key];
    const top = BigInt(hi);
    for (let i = 0; i < d.length; i++) {
      if (d[i] < 0n || d[i] >= top) {
        throw new Err(`${what}: ${key}[${unravel(i, [n, b, t])}] = ${d[i]} is out of range: ${ids} must be in [0, ${hi})`);
      }
    }
  }
  const size = b * t;
  const dims = [b, t];
  const slice = (key, i) => ({ data: data[key].subarray(i * size, (i + 1) * size), dims: dims.slice() });
  return {
    n, batch: b, seq: t, hp, metadata, ...data,
    get(i) {
      if (!(Number.isInteger(i) && i >= 0 && i < n)) throw new Err(`${what}: batch ${i} does not exist (the file holds ${n})`);
      return { tokens: slice('tokens', i), positions: slice('positions', i), labels: slice('labels', i) };
    },
  };
}

/**
 * One-hot float32 labels (B, T, vocab), for artifacts built with dense labels, from integer
 * ids {data, dims} (data: BigInt64Array, Int32Array or number[]). Returns {data, dims}.
 */
export function denseLabels(labels, vocab, Err = Error) {
  const { data, dims } = labels ?? {};
  if (!(ArrayBuffer.isView(data) || Array.isArray(data)) || !Array.isArray(dims) || numel(dims) !== data.length) {
    throw new Err(`labels must be {data, dims} integer ids with data.length = product of dims, got ${show(dims)} and ${data?.length} values`);
  }
  const out = new Float32Array(data.length * vocab);
  for (let i = 0; i < data.length; i++) {
    const id = Number(data[i]);
    if (!(Number.isInteger(id) && id >= 0 && id < vocab)) {
      throw new Err(`labels[${unravel(i, dims)}] = ${data[i]} is out of range: label ids must be in [0, ${vocab})`);
    }
    out[i * vocab + id] = 1;
  }
  return { data: out, dims: [...dims, vocab] };
}
