// Pure helpers for the browser host (no DOM, no onnxruntime): safetensors, manifest checks,
// the ONNX external-data check, the hyperparameter vector, batch files, a seeded batch sampler.
// Runs in browsers and Node (hosts/node imports its checks from here).

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

// ----------------------------------------------------------------------- manifest.json
// The one manifest checker of the JavaScript hosts: the page and hosts/node both call it, and it
// refuses what runtimes/artifacts.py (load_artifacts, _check_manifest) refuses.

export const MANIFEST_FORMAT = 'gpt2-onnx-artifacts';
export const MANIFEST_VERSIONS = [3];
const RETIRED_VERSIONS = new Map([
  [1, 'its train_step.onnx computes wrong embedding gradients on onnxruntime with 2+ threads (ScatterND add races on repeated tokens)'],
  [2, 'its train_step.onnx has no gradient-clipping input (clip) or grad_norm output'],
]);
export const CONFIG_KEYS = ['vocab', 'context', 'd_model', 'n_heads', 'd_ff', 'n_layers', 'seed', 'init', 'labels'];
const CONFIG_SIZES = ['vocab', 'context', 'd_model', 'n_heads', 'd_ff', 'n_layers'];
export const HP_LAYOUT = ['lr', 'beta1', 'beta2', 'eps', 'weight_decay', 'beta1h', 'beta2h'];

const isObject = (x) => x !== null && typeof x === 'object' && !Array.isArray(x);
const kindOf = (x) => (x === null ? 'null' : Array.isArray(x) ? 'list' : typeof x);
const own = (obj, key) => Object.prototype.hasOwnProperty.call(obj, key);
/** A value for an error message: JSON, cut to a readable length. */
function show(x) {
  let s;
  try {
    s = JSON.stringify(x);
  } catch {
    s = undefined;
  }
  if (s === undefined) s = String(x);
  return s.length > 120 ? `${s.slice(0, 117)}...` : s;
}

/**
 * Whether a manifest file name could leave the artifact folder: absolute (POSIX, Windows
 * drive or UNC), or with a ".." segment (either separator, as a browser URL would read it).
 */
function escapesFolder(name) {
  return name === '' || /^[/\\]/.test(name) || /^[A-Za-z]:/.test(name) || name.includes('\0') || name.split(/[/\\]/).includes('..');
}

/**
 * Check a parsed manifest.json: format, version, the type of every key the hosts read, and
 * internal consistency (parameter shapes vs config, file entries). Throws `new Err(message)`
 * naming `where` and the bad value; returns the manifest.
 */
export function checkManifest(manifest, where = 'manifest.json', Err = Error) {
  if (!isObject(manifest)) throw new Err(`${where}: not a ${MANIFEST_FORMAT} manifest (its JSON is a ${kindOf(manifest)}, not an object)`);
  if (manifest.format !== MANIFEST_FORMAT) throw new Err(`${where}: not a ${MANIFEST_FORMAT} manifest (format=${show(manifest.format)})`);
  const version = manifest.format_version;
  if (RETIRED_VERSIONS.has(version)) {
    throw new Err(`${where}: format_version ${version} is retired: ${RETIRED_VERSIONS.get(version)}; rebuild the artifacts (python -m graphgen build, or make artifacts)`);
  }
  if (!MANIFEST_VERSIONS.includes(version)) {
    throw new Err(`${where}: format_version ${show(version)} is not one this host reads (${MANIFEST_VERSIONS.join(', ')}); rebuild the artifacts`);
  }
  const bad = (what) => {
    throw new Err(`${where}: ${what}; the manifest is damaged or from another version (rebuild the artifacts)`);
  };
  for (const [key, kind] of [['config', 'object'], ['parameters', 'list'], ['files', 'object'], ['models', 'object'], ['hp', 'object']]) {
    if (!own(manifest, key)) bad(`missing key "${key}"`);
    if (kindOf(manifest[key]) !== kind) bad(`"${key}" is ${show(manifest[key])} (a ${kindOf(manifest[key])}), expected ${kind === 'list' ? 'a list' : 'an object'}`);
  }
  const cfg = manifest.config;
  const missing = CONFIG_KEYS.filter((k) => !own(cfg, k));
  if (missing.length) throw new Err(`${where}: config lacks ${missing.join(', ')}`);
  for (const k of CONFIG_SIZES) {
    if (!Number.isInteger(cfg[k]) || cfg[k] < 1) bad(`config.${k} = ${show(cfg[k])}, expected an integer >= 1`);
  }
  if (cfg.labels !== 'index' && cfg.labels !== 'dense') bad(`config.labels = ${show(cfg.labels)}, expected "index" or "dense"`);
  // The AdamW constants the hosts build hp from, and the training set's clipping threshold
  // (optional: a caller may give its own).
  for (const [k, ok, range] of [
    ['beta1', (v) => v >= 0 && v < 1, 'in [0, 1)'],
    ['beta2', (v) => v >= 0 && v < 1, 'in [0, 1)'],
    ['eps', (v) => v > 0, '> 0'],
    ['weight_decay', (v) => v >= 0, '>= 0'],
    ['clip', (v) => v >= 0, '>= 0'],
  ]) {
    if (own(cfg, k) && !(typeof cfg[k] === 'number' && Number.isFinite(cfg[k]) && ok(cfg[k]))) bad(`config.${k} = ${show(cfg[k])}, expected a number ${range}`);
  }
  const hp = manifest.hp;
  if (!Array.isArray(hp.layout) || hp.layout.length !== HP_LAYOUT.length || !hp.layout.every((x, i) => x === HP_LAYOUT[i])
      || hp.length !== HP_LAYOUT.length || hp.dtype !== 'float32') {
    bad(`hp is ${show(hp.dtype)}[${show(hp.length)}] ${show(hp.layout)}, this host feeds float32[${HP_LAYOUT.length}] ${show(HP_LAYOUT)}`);
  }
  const names = new Set();
  manifest.parameters.forEach((p, i) => {
    if (!isObject(p) || typeof p.name !== 'string' || p.name === '' || !Array.isArray(p.shape)
        || !p.shape.every((d) => Number.isInteger(d) && d >= 1) || p.dtype !== 'float32') {
      bad(`parameters[${i}] = ${show(p)} is not {name, shape: [positive integers], dtype: "float32"}`);
    }
    if (names.has(p.name)) bad(`parameter ${show(p.name)} is listed twice`);
    names.add(p.name);
  });
  if (names.size === 0) bad('lists no parameters');
  const shapes = new Map(manifest.parameters.map((p) => [p.name, p.shape]));
  for (const [name, keys] of [['wte', ['vocab', 'd_model']], ['wpe', ['context', 'd_model']]]) {
    const got = shapes.get(name);
    if (got && (got.length !== keys.length || got.some((d, i) => d !== cfg[keys[i]]))) {
      const means = got.length === keys.length ? `, which means ${keys.map((k, i) => `${k}=${got[i]}`).join(', ')},` : '';
      throw new Err(
        `${where}: parameter ${name} has shape ${show(got)}${means} but config says ${keys.map((k) => `${k}=${cfg[k]}`).join(', ')} ` +
          `(shape ${show(keys.map((k) => cfg[k]))}): the manifest is from another config`,
      );
    }
  }
  for (const [name, info] of Object.entries(manifest.files)) {
    if (!isObject(info) || typeof info.sha256 !== 'string' || !Number.isInteger(info.bytes) || info.bytes < 0) {
      bad(`files[${show(name)}] = ${show(info)} is not {sha256, bytes}`);
    }
    if (escapesFolder(name)) bad(`files lists ${show(name)}, which is outside the artifact folder`);
  }
  for (const [name, io] of Object.entries(manifest.models)) {
    for (const side of ['inputs', 'outputs']) {
      const list = isObject(io) ? io[side] : undefined;
      if (!Array.isArray(list) || !list.every((x) => isObject(x) && typeof x.name === 'string')) {
        bad(`models[${show(name)}].${side} = ${show(list)} is not a list of {name, ...}`);
      }
    }
  }
  return manifest;
}

/** Check manifest.json (checkManifest) and return what the page needs from it. */
export function readManifest(manifest, where = 'manifest.json') {
  checkManifest(manifest, where);
  return { config: manifest.config, params: manifest.parameters, files: manifest.files };
}

// ------------------------------------------------------------------ ONNX external data
// A tensor in an ONNX model may keep its data in another file (TensorProto.data_location =
// EXTERNAL, external_data {location, offset, length}); ONNX Runtime then reads that path,
// relative to the model or absolute, wherever it points. The models of these artifacts are
// self-contained, so the hosts refuse any model with external data before a session opens it.
// No protobuf library: a bounded walk of the wire format, descending only into the messages
// that can hold a tensor and skipping every other field by its length.

// message kind -> {field number: [field name, message kind]}
const ONNX_TENSOR_FIELDS = {
  model: { 7: ['graph', 'graph'], 20: ['training_info', 'training_info'], 25: ['functions', 'function'] },
  training_info: { 1: ['initialization', 'graph'], 2: ['algorithm', 'graph'] },
  function: { 7: ['node', 'node'], 11: ['attribute_proto', 'attribute'] },
  graph: { 1: ['node', 'node'], 5: ['initializer', 'tensor'], 15: ['sparse_initializer', 'sparse_tensor'] },
  node: { 5: ['attribute', 'attribute'] },
  attribute: {
    5: ['t', 'tensor'], 6: ['g', 'graph'], 10: ['tensors', 'tensor'], 11: ['graphs', 'graph'],
    22: ['sparse_tensor', 'sparse_tensor'], 23: ['sparse_tensors', 'sparse_tensor'],
  },
  sparse_tensor: { 1: ['values', 'tensor'], 2: ['indices', 'tensor'] },
};
const TENSOR_NAME = 8, TENSOR_EXTERNAL_DATA = 13, TENSOR_DATA_LOCATION = 14, DATA_LOCATION_EXTERNAL = 1;
const ONNX_MAX_DEPTH = 100; // protobuf's own default recursion limit

class ProtobufError extends Error {}

/** A varint at bytes[pos]: [value, next position]. Values past 2^53 lose precision (only lengths
 *  and field keys are used as numbers, and those are checked against the buffer). */
function varint(bytes, pos, end) {
  let value = 0;
  let scale = 1;
  for (let i = 0; i < 10; i++) {
    if (pos >= end) throw new ProtobufError(`varint runs past the end of its message at byte ${pos}`);
    const b = bytes[pos++];
    value += (b & 0x7f) * scale;
    if (b < 0x80) return [value, pos];
    scale *= 128;
  }
  throw new ProtobufError(`varint longer than 10 bytes at byte ${pos}`);
}

const utf8 = new TextDecoder('utf-8');

/** Walk one message of `kind` in bytes[start, end); the first tensor with external data, or null. */
function scanMessage(bytes, start, end, kind, path, depth) {
  if (depth > ONNX_MAX_DEPTH) throw new ProtobufError(`messages nest deeper than ${ONNX_MAX_DEPTH} levels at byte ${start}`);
  const isTensor = kind === 'tensor';
  const fields = ONNX_TENSOR_FIELDS[kind];
  let name = '';
  let external = false;
  let location;
  let pos = start;
  while (pos < end) {
    const at = pos;
    let key;
    [key, pos] = varint(bytes, pos, end);
    const field = Math.floor(key / 8);
    const wire = key % 8;
    if (field === 0) throw new ProtobufError(`field number 0 at byte ${at}`);
    if (wire === 0) {
      let value;
      [value, pos] = varint(bytes, pos, end);
      if (isTensor && field === TENSOR_DATA_LOCATION && value === DATA_LOCATION_EXTERNAL) external = true;
    } else if (wire === 1 || wire === 5) {
      pos += wire === 1 ? 8 : 4;
    } else if (wire === 2) {
      let len;
      [len, pos] = varint(bytes, pos, end);
      if (len > end - pos) throw new ProtobufError(`field ${field} at byte ${at} claims ${len} bytes, ${end - pos} remain in its message`);
      const body = pos;
      pos += len;
      if (isTensor) {
        if (field === TENSOR_NAME) name = utf8.decode(bytes.subarray(body, pos));
        if (field === TENSOR_EXTERNAL_DATA) {
          external = true;
          const entry = stringEntry(bytes, body, pos);
          if (entry.key === 'location') location = entry.value;
        }
      } else if (fields[field]) {
        const [fname, next] = fields[field];
        const found = scanMessage(bytes, body, pos, next, `${path}.${fname}`, depth + 1);
        if (found) return found;
      }
    } else {
      throw new ProtobufError(`wire type ${wire} (field ${field}) at byte ${at}, which ONNX models do not use`);
    }
    if (pos > end) throw new ProtobufError(`field ${field} at byte ${at} runs past the end of its message`);
  }
  return external ? { name, path, location } : null;
}

/** StringStringEntryProto {key = 1, value = 2} in bytes[start, end). */
function stringEntry(bytes, start, end) {
  const out = { key: undefined, value: undefined };
  let pos = start;
  while (pos < end) {
    const at = pos;
    let key;
    [key, pos] = varint(bytes, pos, end);
    const field = Math.floor(key / 8);
    const wire = key % 8;
    if (wire === 0) {
      [, pos] = varint(bytes, pos, end);
    } else if (wire === 1 || wire === 5) {
      pos += wire === 1 ? 8 : 4;
    } else if (wire === 2) {
      let len;
      [len, pos] = varint(bytes, pos, end);
      if (len > end - pos) throw new ProtobufError(`external_data field ${field} at byte ${at} claims ${len} bytes, ${end - pos} remain`);
      const text = utf8.decode(bytes.subarray(pos, pos + len));
      if (field === 1) out.key = text;
      if (field === 2) out.value = text;
      pos += len;
    } else {
      throw new ProtobufError(`wire type ${wire} at byte ${at} in an external_data entry`);
    }
    if (pos > end) throw new ProtobufError(`external_data field ${field} at byte ${at} runs past its entry`);
  }
  return out;
}

/**
 * Refuse an ONNX model (bytes of a .onnx file) that keeps any tensor's data outside itself:
 * initializers, sparse initializers, tensor attributes (Constant) in the graph, its subgraphs,
 * functions and training info. Throws `new Err(message)` naming `what` (the model file), the
 * tensor and its external location; also for bytes that are not a well-formed protobuf message.
 */
export function checkSelfContained(bytes, what, Err = Error) {
  const buf = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  let found;
  try {
    found = scanMessage(buf, 0, buf.byteLength, 'model', 'model', 0);
  } catch (e) {
    if (e instanceof ProtobufError) throw new Err(`${what}: not a well-formed ONNX model (${e.message})`);
    throw e;
  }
  if (found) {
    const where = found.location === undefined ? 'no location given' : `location ${show(found.location)}`;
    throw new Err(
      `${what}: tensor ${show(found.name)} (${found.path}) keeps its data in an external file (${where}); ` +
        'the models of these artifacts hold all their data, so a model that reads other files is refused',
    );
  }
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

/** The train_step input names in order: params, m.<p>, v.<p>, tokens, positions, labels, hp, clip. */
export function trainStepInputs(params) {
  const names = params.map((p) => p.name);
  return [...names, ...names.map((n) => `m.${n}`), ...names.map((n) => `v.${n}`), 'tokens', 'positions', 'labels', 'hp', 'clip'];
}

/** The train_step output names in order: loss, grad_norm, new.<p>, new.m.<p>, new.v.<p>. */
export function trainStepOutputs(params) {
  const names = params.map((p) => p.name);
  return ['loss', 'grad_norm', ...names.map((n) => `new.${n}`), ...names.map((n) => `new.m.${n}`), ...names.map((n) => `new.v.${n}`)];
}

/**
 * The global gradient-norm clipping threshold train_step.onnx reads as a float32 scalar: a number
 * >= 0, where 0 and Infinity turn clipping off (as runtimes.hp.check_clip). Throws for anything else.
 */
export function checkClip(clip, Err = Error) {
  if (typeof clip !== 'number' || Number.isNaN(clip) || clip < 0) {
    throw new Err(`clip must be a number >= 0 (0 or Infinity: off), got ${JSON.stringify(clip) ?? String(clip)}`);
  }
  return Math.fround(clip);
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
