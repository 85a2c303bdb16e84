// Pure helpers for the browser host (no DOM, no onnxruntime): safetensors, manifest checks,
// the hyperparameter vector, batch files, a seeded batch sampler. Runs in browsers and Node.

const DTYPES = {
  F32: { size: 4, array: Float32Array },
  F64: { size: 8, array: Float64Array },
  I64: { size: 8, array: BigInt64Array },
  I32: { size: 4, array: Int32Array },
  U8: { size: 1, array: Uint8Array },
};

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

const prod = (shape) => shape.reduce((a, b) => a * b, 1);
const sameShape = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);

/**
 * Parse a safetensors file: 8-byte little-endian header length N, N bytes of JSON header,
 * then the raw little-endian tensor data. Returns {tensors: {name: {dtype, shape, data}},
 * metadata}. `data` is a fresh typed array (copied, so alignment never matters).
 */
export function parseSafetensors(buffer, what = 'safetensors file') {
  const bytes = buffer instanceof Uint8Array ? buffer : new Uint8Array(buffer);
  if (bytes.byteLength < 8) throw new Error(`${what}: ${bytes.byteLength} bytes, too short for a safetensors header`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLen = view.getBigUint64(0, true);
  if (headerLen > BigInt(bytes.byteLength - 8)) {
    throw new Error(`${what}: header length ${headerLen} exceeds the file (${bytes.byteLength} bytes)`);
  }
  const n = Number(headerLen);
  let header;
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(8, 8 + n)));
  } catch (e) {
    throw new Error(`${what}: header is not valid UTF-8 JSON (${e.message})`);
  }
  if (header === null || typeof header !== 'object' || Array.isArray(header)) {
    throw new Error(`${what}: header is not a JSON object`);
  }
  if (!LITTLE_ENDIAN) throw new Error('this platform is big-endian; safetensors data is little-endian');
  const dataStart = 8 + n;
  const dataLen = bytes.byteLength - dataStart;
  const tensors = {};
  let metadata = {};
  for (const [name, info] of Object.entries(header)) {
    if (name === '__metadata__') {
      metadata = info || {};
      continue;
    }
    const dt = DTYPES[info && info.dtype];
    if (!dt) throw new Error(`${what}: tensor ${JSON.stringify(name)} has dtype ${JSON.stringify(info && info.dtype)}; this reader knows ${Object.keys(DTYPES).join(', ')}`);
    const shape = info.shape;
    const offs = info.data_offsets;
    if (!Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d >= 0)) {
      throw new Error(`${what}: tensor ${JSON.stringify(name)} has a bad shape ${JSON.stringify(shape)}`);
    }
    if (!Array.isArray(offs) || offs.length !== 2 || !(offs[0] <= offs[1]) || offs[1] > dataLen) {
      throw new Error(`${what}: tensor ${JSON.stringify(name)} has bad data_offsets ${JSON.stringify(offs)} (data is ${dataLen} bytes)`);
    }
    const nbytes = offs[1] - offs[0];
    if (nbytes !== prod(shape) * dt.size) {
      throw new Error(`${what}: tensor ${JSON.stringify(name)} ${info.dtype}${JSON.stringify(shape)} needs ${prod(shape) * dt.size} bytes, has ${nbytes}`);
    }
    const copy = bytes.slice(dataStart + offs[0], dataStart + offs[1]);
    tensors[name] = { dtype: info.dtype, shape, data: new dt.array(copy.buffer, 0, prod(shape)) };
  }
  return { tensors, metadata };
}

/** Check manifest.json's format and return what the page needs from it. */
export function readManifest(manifest, where = 'manifest.json') {
  if (!manifest || manifest.format !== 'gpt2-onnx-artifacts') {
    throw new Error(`${where}: format is ${JSON.stringify(manifest && manifest.format)}, expected "gpt2-onnx-artifacts"`);
  }
  if (manifest.format_version !== 2) {
    throw new Error(`${where}: format_version ${JSON.stringify(manifest.format_version)} is not supported (this page reads 2; rebuild the artifacts)`);
  }
  const cfg = manifest.config || {};
  for (const k of ['vocab', 'context', 'd_model', 'n_layers']) {
    if (!Number.isInteger(cfg[k]) || cfg[k] <= 0) throw new Error(`${where}: config.${k} is ${JSON.stringify(cfg[k])}`);
  }
  if (cfg.labels !== 'index' && cfg.labels !== 'dense') {
    throw new Error(`${where}: config.labels is ${JSON.stringify(cfg.labels)}, expected "index" or "dense"`);
  }
  const params = manifest.parameters;
  if (!Array.isArray(params) || params.length === 0) throw new Error(`${where}: no parameters`);
  for (const p of params) {
    if (p.dtype !== 'float32') throw new Error(`${where}: parameter ${p.name} has dtype ${p.dtype}; expected float32`);
  }
  const layout = manifest.hp && manifest.hp.layout;
  const want = ['lr', 'beta1', 'beta2', 'eps', 'weight_decay', 'beta1h', 'beta2h'];
  if (!Array.isArray(layout) || !sameShape(layout, want)) {
    throw new Error(`${where}: hp.layout is ${JSON.stringify(layout)}, this page writes ${JSON.stringify(want)}`);
  }
  return { config: cfg, params, files: manifest.files || {} };
}

/** Every parameter of the manifest from a parsed weights file, checked, in manifest order. */
export function weightsFor(params, parsed, what = 'weights.safetensors') {
  const out = [];
  for (const p of params) {
    const t = parsed.tensors[p.name];
    if (!t) throw new Error(`${what}: parameter ${JSON.stringify(p.name)} is missing`);
    if (t.dtype !== 'F32') throw new Error(`${what}: ${p.name} is ${t.dtype}, expected F32`);
    if (!sameShape(t.shape, p.shape)) {
      throw new Error(`${what}: ${p.name} has shape ${JSON.stringify(t.shape)}, the manifest says ${JSON.stringify(p.shape)}`);
    }
    out.push(t.data);
  }
  return out;
}

/** The train_step input names in order: params, m.<p>, v.<p>, tokens, positions, labels, hp. */
export function trainStepInputs(params) {
  const names = params.map((p) => p.name);
  return [...names, ...names.map((n) => `m.${n}`), ...names.map((n) => `v.${n}`), 'tokens', 'positions', 'labels', 'hp'];
}

/**
 * float32[7] for update number t (t >= 1): [lr, beta1, beta2, eps, wd, 1/(1-beta1^t), 1/(1-beta2^t)],
 * computed in float64 from the float32 betas and rounded to float32, as runtimes.make_hp does.
 */
export function makeHp({ lr, beta1, beta2, eps, weight_decay: wd }, t) {
  if (!Number.isInteger(t) || t < 1) throw new Error(`step t must be an integer >= 1, got ${t}`);
  // corrections from the float32 betas the vector carries, as runtimes.make_hp
  const b1 = Math.fround(beta1), b2 = Math.fround(beta2);
  const b1h = b1 > 0 ? 1 / (1 - b1 ** t) : 1;
  const b2h = b2 > 0 ? 1 / (1 - b2 ** t) : 1;
  return new Float32Array([lr, beta1, beta2, eps, wd, b1h, b2h]);
}

/** Check the five AdamW numbers a user or a batch file gave; returns them as numbers. */
export function checkHp(hp, where) {
  const out = {};
  for (const k of ['lr', 'beta1', 'beta2', 'eps', 'weight_decay']) {
    const v = Number(hp[k]);
    if (hp[k] === undefined || hp[k] === null || hp[k] === '' || !Number.isFinite(v)) {
      throw new Error(`${where}: ${k} is ${JSON.stringify(hp[k])}, expected a finite number`);
    }
    out[k] = v;
  }
  if (out.lr < 0) throw new Error(`${where}: lr must be >= 0, got ${out.lr}`);
  for (const k of ['beta1', 'beta2']) {
    if (!(out[k] >= 0 && out[k] < 1)) throw new Error(`${where}: ${k} must be in [0, 1), got ${out[k]}`);
  }
  if (!(out.eps > 0)) throw new Error(`${where}: eps must be > 0, got ${out.eps}`);
  if (out.weight_decay < 0) throw new Error(`${where}: weight_decay must be >= 0, got ${out.weight_decay}`);
  return out;
}

function checkIds(arr, lo, hi, what) {
  for (let i = 0; i < arr.length; i++) {
    const x = Number(arr[i]);
    if (!(x >= lo && x < hi)) throw new Error(`${what}[${i}] = ${arr[i]} is outside [${lo}, ${hi})`);
  }
}

/**
 * A batch file, in one of two forms:
 *  - JSON {format: "gpt2-onnx-batches", version: 1, shape: [N, B, T], hp: {lr, beta1, beta2,
 *    eps, weight_decay}, tokens, positions, labels (flat row-major integer lists), config?};
 *  - safetensors as runtimes/batchfile.py writes it: I64 tokens/positions/labels (N, B, T);
 *    __metadata__ format "gpt2-onnx-batches", format_version "1", lr/beta1/beta2/eps/weight_decay
 *    as decimal strings, config (JSON of the architecture).
 * A config that disagrees with the model's (vocab, context, labels, ...) is refused.
 * Returns {n, batch, seq, hp, tokens, positions, labels} with BigInt64Array data.
 */
export function readBatches(source, modelConfig, what = 'batch file') {
  const { vocab, context } = modelConfig;
  let n, b, t, hp, tok, pos, lab;
  let batchConfig = null; // the architecture the batches were written for, when the file says
  if (source instanceof ArrayBuffer || source instanceof Uint8Array) {
    const { tensors, metadata } = parseSafetensors(source, what);
    const get = (k) => {
      const x = tensors[k];
      if (!x) throw new Error(`${what}: tensor ${k} is missing`);
      if (x.dtype !== 'I64' || x.shape.length !== 3) throw new Error(`${what}: ${k} must be I64 (N, B, T), got ${x.dtype}${JSON.stringify(x.shape)}`);
      return x;
    };
    const xt = get('tokens'), xp = get('positions'), xl = get('labels');
    if (!sameShape(xt.shape, xp.shape) || !sameShape(xt.shape, xl.shape)) {
      throw new Error(`${what}: tokens ${JSON.stringify(xt.shape)}, positions ${JSON.stringify(xp.shape)} and labels ${JSON.stringify(xl.shape)} differ`);
    }
    [n, b, t] = xt.shape;
    if (metadata.format !== undefined && metadata.format !== 'gpt2-onnx-batches') {
      throw new Error(`${what}: metadata format ${JSON.stringify(metadata.format)} is not "gpt2-onnx-batches"`);
    }
    if (metadata.format_version !== undefined && metadata.format_version !== '1') {
      throw new Error(`${what}: metadata format_version ${JSON.stringify(metadata.format_version)} is not supported (this page reads "1")`);
    }
    hp = checkHp(metadata, `${what} metadata`);
    if (metadata.config !== undefined) {
      let cfg;
      try { cfg = JSON.parse(metadata.config); } catch (e) { throw new Error(`${what}: metadata config is not JSON (${e.message})`); }
      batchConfig = cfg;
    }
    tok = xt.data; pos = xp.data; lab = xl.data;
  } else {
    const js = source;
    if (!js || js.format !== 'gpt2-onnx-batches' || js.version !== 1) {
      throw new Error(`${what}: format/version is ${JSON.stringify(js && js.format)}/${JSON.stringify(js && js.version)}, expected "gpt2-onnx-batches"/1`);
    }
    if (!Array.isArray(js.shape) || js.shape.length !== 3 || !js.shape.every((d) => Number.isInteger(d) && d > 0)) {
      throw new Error(`${what}: shape must be [N, B, T] of positive integers, got ${JSON.stringify(js.shape)}`);
    }
    [n, b, t] = js.shape;
    hp = checkHp(js.hp || {}, `${what} hp`);
    if (js.config !== undefined) batchConfig = js.config;
    const conv = (k) => {
      const a = js[k];
      if (!Array.isArray(a) || a.length !== n * b * t) {
        throw new Error(`${what}: ${k} must be a flat list of N*B*T = ${n * b * t} integers, got ${Array.isArray(a) ? a.length : typeof a}`);
      }
      if (!a.every(Number.isInteger)) throw new Error(`${what}: ${k} holds a value that is not an integer`);
      return BigInt64Array.from(a, (x) => BigInt(x));
    };
    tok = conv('tokens'); pos = conv('positions'); lab = conv('labels');
  }
  if (batchConfig !== null) {
    if (typeof batchConfig !== 'object' || Array.isArray(batchConfig)) throw new Error(`${what}: config is not an object`);
    for (const [k, v] of Object.entries(batchConfig)) {
      if (k in modelConfig && modelConfig[k] !== v) {
        throw new Error(`${what} was written for ${k}=${JSON.stringify(v)}, but these artifacts have ${k}=${JSON.stringify(modelConfig[k])}`);
      }
    }
  }
  if (t > context) throw new Error(`${what}: sequence length T=${t} exceeds the model's context ${context}`);
  checkIds(tok, 0, vocab, `${what} tokens`);
  checkIds(lab, 0, vocab, `${what} labels`);
  checkIds(pos, 0, context, `${what} positions`);
  return { n, batch: b, seq: t, hp, tokens: tok, positions: pos, labels: lab };
}

/** Batch number i (0-based) of a readBatches() result as {tokens, positions, labels} (B*T each). */
export function batchAt(batches, i) {
  const size = batches.batch * batches.seq;
  const sl = (a) => a.subarray(i * size, (i + 1) * size);
  return { tokens: sl(batches.tokens), positions: sl(batches.positions), labels: sl(batches.labels) };
}

/** mulberry32: a small seeded 32-bit PRNG; returns floats in [0, 1). */
export function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * Random windows of a byte array, like runtimes.data.BatchSampler (not the same stream of
 * offsets: this one uses mulberry32): tokens data[o:o+T], labels data[o+1:o+T+1], positions 0..T-1.
 */
export function byteSampler(data, batch, seq, seed) {
  if (data.length < seq + 1) throw new Error(`the text has ${data.length} bytes; sequence length ${seq} needs at least ${seq + 1}`);
  const rand = mulberry32(seed);
  const high = data.length - seq; // offsets 0 .. n-T-1
  return () => {
    const tokens = new BigInt64Array(batch * seq);
    const positions = new BigInt64Array(batch * seq);
    const labels = new BigInt64Array(batch * seq);
    for (let r = 0; r < batch; r++) {
      const o = Math.floor(rand() * high);
      for (let j = 0; j < seq; j++) {
        tokens[r * seq + j] = BigInt(data[o + j]);
        labels[r * seq + j] = BigInt(data[o + j + 1]);
        positions[r * seq + j] = BigInt(j);
      }
    }
    return { tokens, positions, labels };
  };
}

/** One-hot float32 (B*T*V) of index labels, for artifacts built with --labels dense. */
export function denseLabels(labels, vocab) {
  const out = new Float32Array(labels.length * vocab);
  for (let i = 0; i < labels.length; i++) out[i * vocab + Number(labels[i])] = 1;
  return out;
}

/** Index of the largest value (first one on ties). */
export function argmax(values, start = 0, end = values.length) {
  let best = start;
  for (let i = start + 1; i < end; i++) if (values[i] > values[best]) best = i;
  return best - start;
}

/** Sample from softmax(logits / temperature) with a [0, 1) random number. */
export function sampleLogits(values, start, end, temperature, u) {
  let max = -Infinity;
  for (let i = start; i < end; i++) max = Math.max(max, values[i]);
  const w = new Float64Array(end - start);
  let sum = 0;
  for (let i = start; i < end; i++) sum += w[i - start] = Math.exp((values[i] - max) / temperature);
  let acc = 0;
  for (let k = 0; k < w.length; k++) {
    acc += w[k] / sum;
    if (u < acc) return k;
  }
  return w.length - 1;
}

/** Lowercase hex SHA-256 of bytes, with WebCrypto (null where it is unavailable: not a secure context). */
export async function sha256Hex(bytes) {
  const subtle = globalThis.crypto && globalThis.crypto.subtle;
  if (!subtle) return null;
  const digest = new Uint8Array(await subtle.digest('SHA-256', bytes));
  return Array.from(digest, (x) => x.toString(16).padStart(2, '0')).join('');
}
