// gpt2train.mjs: train gpt2-onnx-train artifacts from Node.js.
//
// Two trainers share one contract (manifest.json, weights.safetensors, the hp vector):
//   PortableTrainer     onnxruntime-node InferenceSession on train_step.onnx; parameters and
//                       AdamW moments are tensors held here and replaced by the new.* outputs.
//   TrainingSetTrainer  onnxruntime-web 1.19.2's training build (WebAssembly) on the ONNX
//                       Runtime training set (training_model.onnx, eval_model.onnx,
//                       optimizer_model.onnx, checkpoint).
//
// Every public input is checked before anything runs; problems throw GPT2Error subclasses
// whose message names the bad value and the allowed range.

import { createHash, randomBytes } from 'node:crypto';
import {
  accessSync, closeSync, constants, existsSync, fsyncSync, lstatSync, openSync, readFileSync, realpathSync, renameSync, statSync,
  unlinkSync, writeSync,
} from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';

// The contract (constants, manifest checks, hp, safetensors, batch files, samplers, the ONNX
// external-data check) is hosts/common's, shared with the page: both hosts refuse the same
// artifacts and build the same vectors. Its checks throw the error class they are given;
// this module passes its own (below).
import { BATCH_FORMAT, denseLabels as commonDenseLabels, readBatches } from '../common/batches.mjs';
import {
  BATCH_INPUTS, CLIP_INPUT, CONFIG_KEYS, DENSE_SUM_TOL, GRAD_NORM_OUTPUT, HP_INPUT, HP_LAYOUT, HP_RTOL, LOSS_OUTPUT, MANIFEST_FORMAT,
  MANIFEST_VERSIONS, TRAINING_SET_FILES, mName, newMName, newName, newVName, trainStepInputs, trainStepOutputs, vName,
} from '../common/contract.mjs';
import { checkClip, checkHp as commonCheckHp, makeHp as commonMakeHp } from '../common/hp.mjs';
import { checkManifest, frozenFeeds, frozenParameters, weightsFor } from '../common/manifest.mjs';
import { checkSelfContained } from '../common/onnx_scan.mjs';
import { encodeSafetensors as commonEncodeSafetensors, parseSafetensors } from '../common/safetensors.mjs';
import { byteSampler as commonByteSampler, mulberry32, randomSampler, tokenSampler as commonTokenSampler } from '../common/samplers.mjs';
import { TOKENIZER_FILE, makeTokenizer, tokenizerEntry } from '../common/tokenizer.mjs';
import { numel, unravel } from '../common/util.mjs';

import { Tokenizer } from '@huggingface/tokenizers';

const require = createRequire(import.meta.url);

export { BATCH_FORMAT, CONFIG_KEYS, DENSE_SUM_TOL, HP_LAYOUT, HP_RTOL, MANIFEST_FORMAT, mulberry32, randomSampler };
export const SUPPORTED_VERSIONS = MANIFEST_VERSIONS; // older ones are retired: contract/constants.json says why

// ------------------------------------------------------------------------------ errors
export class GPT2Error extends Error {
  constructor(message) {
    super(message);
    this.name = this.constructor.name;
  }
}
/** A batch, hyperparameter vector or option is malformed; nothing ran or changed. */
export class InputError extends GPT2Error {}
/** An artifact folder is incomplete, corrupted, or from another version or config. */
export class ArtifactError extends GPT2Error {}
/** A safetensors file (weights, batches) is unreadable or does not match. */
export class DataError extends GPT2Error {}
/** The loss became NaN or infinite; the update was not applied. */
export class TrainingDiverged extends GPT2Error {}

// ------------------------------------------------------------------------- safetensors
/**
 * Read a safetensors file: { tensors: {name: {dtype, shape, data}}, metadata }
 * (hosts/common/safetensors.mjs parseSafetensors; problems are DataError).
 * `buf`, when given, is the file's content already read (and verified) by the caller.
 */
export function readSafetensors(file, buf = undefined) {
  if (buf === undefined) {
    try {
      buf = readFileSync(file);
    } catch (e) {
      throw new DataError(`cannot read ${file}: ${e.code === 'ENOENT' ? 'no such file' : e.message}`);
    }
  }
  return parseSafetensors(buf, file, DataError);
}

/**
 * Write `bytes` to `file` atomically: a new temp file in the same folder, fsync, rename over
 * `file`, fsync the folder. Readers see the old file or the whole new one, never a part.
 */
export function writeFileAtomic(file, bytes) {
  const target = path.resolve(file);
  const dir = path.dirname(target);
  if (!existsSync(dir)) throw new InputError(`cannot write ${file}: folder ${dir} does not exist`);
  let tmp;
  let fd;
  try {
    // 'wx' (O_CREAT | O_EXCL) never opens an existing name, a planted symlink included, so the
    // bytes land only in a file this call created; rename then replaces whatever is at `file`
    // (a symlink itself, not its target).
    for (let attempt = 1; fd === undefined; attempt++) {
      tmp = path.join(dir, `.${path.basename(target)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
      try {
        fd = openSync(tmp, 'wx', 0o644);
      } catch (e) {
        tmp = undefined;
        if (e.code !== 'EEXIST' || attempt >= 8) throw e;
      }
    }
    let off = 0;
    while (off < bytes.length) off += writeSync(fd, bytes, off, bytes.length - off);
    fsyncSync(fd);
    closeSync(fd);
    fd = undefined;
    renameSync(tmp, target);
    tmp = undefined;
    fsyncFolder(dir);
  } catch (e) {
    if (fd !== undefined) closeSync(fd);
    if (tmp !== undefined) {
      try {
        unlinkSync(tmp);
      } catch {}
    }
    throw e instanceof GPT2Error ? e : new InputError(`cannot write ${file}: ${e.message}`);
  }
}

/** fsync a folder, so a rename in it survives a crash (Windows cannot open folders; skipped there). */
function fsyncFolder(dir) {
  if (process.platform === 'win32') return;
  const fd = openSync(dir, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

const MANIFEST_MAX_BYTES = 64 << 20; // a manifest is a few hundred KiB; as runtimes/artifacts.py

/** The artifact folder (manifest.json of this format) that real folder `dir` is or lies in, or null. */
function artifactFolderHolding(dir) {
  for (let d = dir; ; d = path.dirname(d)) {
    const mpath = path.join(d, 'manifest.json');
    try {
      const st = statSync(mpath);
      if (st.isFile() && st.size <= MANIFEST_MAX_BYTES && JSON.parse(readFileSync(mpath, 'utf8'))?.format === MANIFEST_FORMAT) return d;
    } catch {}
    if (path.dirname(d) === d) return null;
  }
}

/**
 * Check that the host may write `file`: its folder exists and is writable, it is not a folder
 * itself, and it lies outside the artifact folder `artifacts` and any other (compared by real
 * paths, so a symlinked folder cannot lead into one): artifacts stay exactly as built and
 * hashed. Returns the absolute path.
 */
export function checkOutputPath(file, artifacts = undefined) {
  const target = path.resolve(file);
  const dir = path.dirname(target);
  let realDir;
  try {
    realDir = realpathSync(dir);
  } catch {
    throw new InputError(`cannot write ${file}: folder ${dir} does not exist`);
  }
  if (!statSync(realDir).isDirectory()) throw new InputError(`cannot write ${file}: ${dir} is not a folder`);
  try {
    accessSync(realDir, constants.W_OK);
  } catch {
    throw new InputError(`cannot write ${file}: folder ${dir} is not writable`);
  }
  const realArt = artifacts === undefined ? undefined : realpathSync(artifacts);
  let holder;
  if (realArt !== undefined && (realDir === realArt || realDir.startsWith(realArt + path.sep))) {
    holder = `${artifacts}${realArt !== path.resolve(artifacts) ? ` (${realArt})` : ''}`;
  } else {
    holder = artifactFolderHolding(realDir);
  }
  if (holder) {
    throw new InputError(`cannot write ${file}: it is inside the artifact folder ${holder}, which the host never writes to; choose a path outside it`);
  }
  let st;
  try {
    st = lstatSync(target);
  } catch {}
  if (st?.isDirectory()) throw new InputError(`cannot write ${file}: it is a folder`);
  return target;
}

/** Tensors ({name: {data: TypedArray, shape}}) as safetensors bytes (hosts/common/safetensors.mjs; problems are InputError). */
export function encodeSafetensors(tensors, metadata = undefined) {
  return commonEncodeSafetensors(tensors, metadata, InputError);
}

/**
 * Save parameters as safetensors, atomically. params[name] is {data, shape}, or a typed
 * array whose shape is shapes[name] (e.g. the manifest's, loadArtifacts().shapes).
 */
export function saveSafetensors(file, params, shapes = {}, metadata = undefined) {
  const tensors = {};
  for (const [name, value] of Object.entries(params)) {
    if (ArrayBuffer.isView(value)) {
      const shape = shapes[name];
      if (!shape) throw new InputError(`no shape known for tensor ${name}: pass {data, shape} or shapes[${JSON.stringify(name)}]`);
      tensors[name] = { data: value, shape };
    } else {
      tensors[name] = { data: value.data, shape: value.shape ?? value.dims };
    }
  }
  writeFileAtomic(file, encodeSafetensors(tensors, metadata));
}

// --------------------------------------------------------------------------- artifacts
export function sha256File(file) {
  return createHash('sha256').update(readFileSync(file)).digest('hex');
}

/**
 * Read and check `folder/manifest.json` (hosts/common/manifest.mjs checkManifest: format, version,
 * structure, consistency). `needs` lists the files the caller will open: each must be listed
 * in the manifest, present, of the listed size, with the listed sha256, and each .onnx among
 * them must keep all its data inside itself (no external data, which could point anywhere).
 * Their verified bytes are kept for the caller: art.take(name) hands them over once, so the
 * sessions run exactly what was checked.
 */
export function loadArtifacts(folder, needs = [], { frozen = false } = {}) {
  if (!existsSync(folder) || !statSync(folder).isDirectory()) {
    throw new ArtifactError(`artifact folder ${folder} does not exist (build it with: python -m graphgen build --out ${folder})`);
  }
  const mpath = path.join(folder, 'manifest.json');
  if (!existsSync(mpath)) throw new ArtifactError(`${folder} has no manifest.json; is it an artifact folder? (python -m graphgen build --out ${folder})`);
  const msize = statSync(mpath).size;
  if (msize > MANIFEST_MAX_BYTES) throw new ArtifactError(`${mpath} is ${msize} bytes; a manifest is a few hundred KiB at most`);
  let manifest;
  try {
    manifest = JSON.parse(readFileSync(mpath, 'utf8'));
  } catch (e) {
    throw new ArtifactError(`${mpath} is not valid JSON: ${e.message}`);
  }
  checkManifest(manifest, mpath, ArtifactError, { frozen });
  const tokenizer = tokenizerEntry(manifest, mpath, ArtifactError); // a kind this host cannot tokenize is refused here
  const verified = new Map(needs.map((name) => [name, verifiedFile(folder, manifest, name)]));
  const params = manifest.parameters.map((p) => ({ name: p.name, shape: p.shape.slice(), dtype: p.dtype }));
  return {
    folder,
    manifest,
    config: manifest.config,
    params,
    /** A LoRA folder's base weights (inputs read, never updated); [] elsewhere. */
    frozen: frozenParameters(manifest).map((p) => ({ name: p.name, shape: p.shape.slice(), dtype: p.dtype })),
    shapes: Object.fromEntries(params.map((p) => [p.name, p.shape])),
    /** The manifest's tokenizer entry (hosts/common/tokenizer.mjs tokenizerEntry; loadTokenizer opens it). */
    tokenizer,
    file: (name) => path.join(folder, name),
    /** The verified bytes of a file in `needs`, once (then dropped, so they are not held twice);
     *  undefined for any other name. */
    take(name) {
      const bytes = verified.get(name);
      verified.delete(name);
      return bytes;
    },
  };
}

/**
 * The bytes of file `name` of the artifact folder, checked against the manifest: listed, present,
 * of the listed size and sha256, and an .onnx self-contained (no external data).
 */
function verifiedFile(folder, manifest, name) {
  const info = Object.prototype.hasOwnProperty.call(manifest.files, name) ? manifest.files[name] : undefined;
  if (!info) throw new ArtifactError(`${folder}: manifest.json lists no file ${name}`);
  const file = path.join(folder, name);
  if (!existsSync(file)) throw new ArtifactError(`${folder}: file ${name} listed in manifest.json is missing`);
  let bytes;
  try {
    bytes = readFileSync(file);
  } catch (e) {
    throw new ArtifactError(`${file} cannot be read: ${e.message}`);
  }
  if (bytes.length !== info.bytes) throw new ArtifactError(`${file}: ${bytes.length} bytes, manifest.json says ${info.bytes} (truncated or replaced?)`);
  const sha = createHash('sha256').update(bytes).digest('hex');
  if (sha !== info.sha256) {
    throw new ArtifactError(`${file}: sha256 ${sha} differs from manifest.json's ${info.sha256} (corrupted or from another build)`);
  }
  if (name.endsWith('.onnx')) checkSelfContained(bytes, file, ArtifactError);
  return bytes;
}

/**
 * The artifact folder's tokenizer (hosts/common/tokenizer.mjs makeTokenizer): {kind, vocabSize,
 * encode(text) -> ids, decode(ids) -> text}. Byte-level, or the folder's tokenizer.json (checked
 * against the manifest first) run by @huggingface/tokenizers: Python `tokenizers`' ids.
 */
export function loadTokenizer(art) {
  const entry = art.tokenizer;
  if (entry.kind === 'bytes') return makeTokenizer(entry, {}, ArtifactError);
  const json = art.take(TOKENIZER_FILE) ?? verifiedFile(art.folder, art.manifest, TOKENIZER_FILE);
  return makeTokenizer(entry, { json, Tokenizer, where: art.file(TOKENIZER_FILE) }, ArtifactError);
}

/** A LoRA folder's base.safetensors, verified against the manifest, as feeds of `Tensor`s
 *  (hosts/common frozenFeeds): {name: Tensor} of its frozen inputs; {} for a full folder. */
function loadFrozen(art, Tensor) {
  if (art.frozen.length === 0) return {};
  const file = art.manifest.frozen.file;
  return frozenFeeds(Tensor, art.manifest, verifiedFile(art.folder, art.manifest, file), art.file(file), ArtifactError);
}

/** weights.safetensors (or `file`) checked against the manifest: every parameter, float32, the
 *  manifest's shape. The artifacts' own file is parsed from the bytes loadArtifacts verified. */
export function loadWeights(art, file = undefined) {
  const verified = art.take?.('weights.safetensors'); // taken even when `file` replaces it: not held twice
  file ??= art.file('weights.safetensors');
  const { tensors } = readSafetensors(file, file === art.file('weights.safetensors') ? verified : undefined);
  return weightsFor(art.params, tensors, file, ArtifactError);
}

// ----------------------------------------------------------------------------------- hp
/**
 * The float32[7] hp vector for update number t (t = 1 first):
 * [lr, beta1, beta2, eps, wd, 1/(1-beta1^t), 1/(1-beta2^t)], as contract/hp.py make_hp
 * (hosts/common/hp.mjs; values out of range are InputError).
 */
export function makeHp(lr, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 0.01, t = 1) {
  return commonMakeHp(lr, beta1, beta2, eps, wd, t, InputError);
}

/** Validate hp for update number t; returns it as a Float32Array(7) (InputError otherwise). */
export function checkHp(hp, t) {
  return commonCheckHp(hp, t, InputError);
}

// ------------------------------------------------------------------------------ batches
/**
 * Normalise an integer (B, T) batch input: nested arrays (number[][]), or {data, dims}
 * with data a BigInt64Array, Int32Array, or number[]. Returns {data: BigInt64Array, dims}.
 */
function intBatch(name, x) {
  let data;
  let dims;
  if (Array.isArray(x) && x.every(Array.isArray)) {
    dims = [x.length, x[0]?.length ?? 0];
    if (!x.every((r) => r.length === dims[1])) throw new InputError(`${name} rows have different lengths; ${name} must be (batch, seq)`);
    data = x.flat();
  } else if (x && typeof x === 'object' && 'data' in x && 'dims' in x) {
    ({ data, dims } = x);
  } else {
    throw new InputError(`${name} must be a (batch, seq) array of arrays or {data, dims}, got ${x === null ? 'null' : typeof x}`);
  }
  if (!Array.isArray(dims) || dims.length !== 2) throw new InputError(`${name} must have shape (batch, seq), got ${JSON.stringify(dims)}`);
  if (!(data instanceof BigInt64Array || data instanceof Int32Array || Array.isArray(data))) {
    throw new InputError(`${name} must hold integers (BigInt64Array, Int32Array or number[]), got ${data?.constructor?.name}`);
  }
  if (data.length !== dims[0] * dims[1]) throw new InputError(`${name} has ${data.length} values, shape ${JSON.stringify(dims)} needs ${dims[0] * dims[1]}`);
  if (!(data instanceof BigInt64Array)) {
    const out = new BigInt64Array(data.length);
    for (let i = 0; i < data.length; i++) {
      if (!Number.isInteger(data[i])) throw new InputError(`${name}[${unravel(i, dims)}] = ${data[i]} is not an integer`);
      out[i] = BigInt(data[i]);
    }
    data = out;
  }
  return { data, dims: dims.slice() };
}

function checkRange(name, { data, dims }, hi, what) {
  for (let i = 0; i < data.length; i++) {
    if (data[i] < 0n || data[i] >= BigInt(hi)) {
      throw new InputError(`${name}[${unravel(i, dims)}] = ${data[i]} is out of range: ${what} must be in [0, ${hi})`);
    }
  }
}

/** Check a batch against the config; returns {tokens, positions, labels} ready for ONNX Runtime. */
export function checkBatch(config, tokens, positions, labels) {
  const { vocab, context } = config;
  tokens = intBatch('tokens', tokens);
  positions = intBatch('positions', positions);
  const [b, t] = tokens.dims;
  if (b < 1 || t < 1) throw new InputError(`tokens has shape [${tokens.dims}]: batch and seq must both be >= 1`);
  if (t > context) throw new InputError(`tokens has seq length ${t} > context ${context}: T must be in [1, ${context}]`);
  if (positions.dims[0] !== b || positions.dims[1] !== t) throw new InputError(`positions shape [${positions.dims}] differs from tokens shape [${tokens.dims}]`);
  checkRange('tokens', tokens, vocab, 'token ids');
  checkRange('positions', positions, context, 'positions');
  if (config.labels === 'index') {
    if (labels?.data instanceof Float32Array) {
      throw new InputError(`labels must be integer (B, T) next-token ids for these index-mode artifacts, got float32 [${labels.dims}]`);
    }
    labels = intBatch('labels', labels);
    if (labels.dims[0] !== b || labels.dims[1] !== t) throw new InputError(`labels shape [${labels.dims}] differs from tokens shape [${tokens.dims}]`);
    checkRange('labels', labels, vocab, 'label ids');
  } else {
    if (!(labels?.data instanceof Float32Array)) {
      throw new InputError(`labels must be float32 (B, T, ${vocab}) distributions {data: Float32Array, dims} for these dense-mode artifacts (denseLabels() makes them from ids)`);
    }
    const d = labels.dims;
    if (!Array.isArray(d) || d.length !== 3 || d[0] !== b || d[1] !== t || d[2] !== vocab) {
      throw new InputError(`labels shape ${JSON.stringify(d)} must be [${b}, ${t}, ${vocab}] (tokens shape + vocab)`);
    }
    if (labels.data.length !== b * t * vocab) throw new InputError(`labels has ${labels.data.length} values, shape needs ${b * t * vocab}`);
    for (let r = 0; r < b * t; r++) {
      let sum = 0;
      for (let k = 0; k < vocab; k++) {
        const x = labels.data[r * vocab + k];
        if (!Number.isFinite(x) || x < 0) throw new InputError(`labels[${unravel(r * vocab + k, d)}] = ${x}: dense labels must be finite and >= 0`);
        sum += x;
      }
      if (Math.abs(sum - 1) > DENSE_SUM_TOL) throw new InputError(`labels[${unravel(r * vocab, d).split(', ').slice(0, 2).join(', ')}] sums to ${sum}: each dense label row must sum to 1 (within ${DENSE_SUM_TOL})`);
    }
  }
  return { tokens, positions, labels };
}

/** One-hot float32 (B, T, vocab) labels {data, dims} from integer ids (as checkBatch takes them). */
export function denseLabels(labels, vocab) {
  return commonDenseLabels(intBatch('labels', labels), vocab, InputError);
}

/** ONNX Runtime tensors of a checked batch (checkBatch: keyed by the contract's input names). */
function batchFeeds(Tensor, batch) {
  const tensor = ({ data, dims }) => new Tensor(data instanceof Float32Array ? 'float32' : 'int64', data, dims);
  return Object.fromEntries(BATCH_INPUTS.map((name) => [name, tensor(batch[name])]));
}

// ---------------------------------------------------------------- portable train step
let ortNode;
async function onnxruntimeNode() {
  ortNode ??= (await import('onnxruntime-node')).default;
  return ortNode;
}

/** onnxruntime-node on train_step.onnx; parameters and moments live here between steps. */
export class PortableTrainer {
  static NEEDS = ['train_step.onnx', 'weights.safetensors'];

  /** @param {string} folder artifact folder; opts.threads: intra-op threads; opts.weights: a safetensors file to start from */
  static async create(folder, opts = {}) {
    // frozen inputs (a LoRA folder's base) are fed at every step and never replaced
    const art = loadArtifacts(folder, PortableTrainer.NEEDS, { frozen: true });
    const weights = loadWeights(art, opts.weights);
    const ort = await onnxruntimeNode();
    const frozen = loadFrozen(art, ort.Tensor);
    const so = {
      graphOptimizationLevel: 'all',
      executionMode: 'sequential',
      logSeverityLevel: 3,
      extra: { session: { set_denormal_as_zero: '1' } },
    };
    if (opts.threads) so.intraOpNumThreads = opts.threads;
    // From the verified bytes, not the path: the session runs what loadArtifacts checked.
    const session = await ort.InferenceSession.create(art.take('train_step.onnx'), so);
    return new PortableTrainer(art, ort, session, weights, frozen);
  }

  /** `frozen`: loadFrozen's feeds, the same tensors at every step. */
  constructor(art, ort, session, weights, frozen = {}) {
    this.art = art;
    this.ort = ort;
    this.session = session;
    this.stepCount = 0;
    const io = art.manifest.models['train_step.onnx'];
    if (!io) throw new ArtifactError(`${art.folder}: manifest.json describes no model train_step.onnx`);
    this.inputNames = io.inputs.map((i) => i.name);
    this.outputNames = io.outputs.map((o) => o.name);
    const expectIn = trainStepInputs(art.params, art.frozen);
    const expectOut = trainStepOutputs(art.params);
    for (const [what, want, have, sess] of [['inputs', expectIn, this.inputNames, session.inputNames], ['outputs', expectOut, this.outputNames, session.outputNames]]) {
      const missing = want.filter((n) => !have.includes(n) || !sess.includes(n));
      if (missing.length) throw new ArtifactError(`train_step.onnx ${what} lack ${missing.slice(0, 5).join(', ')} (manifest and model disagree with the train_step contract)`);
    }
    this.frozen = frozen;
    // state: every input a step reads back, and the output that replaces it after the step
    this.state = {};
    this.updates = [];
    for (const { name, shape } of art.params) {
      const zeros = () => new ort.Tensor('float32', new Float32Array(numel(shape)), shape);
      this.state[name] = new ort.Tensor('float32', weights[name], shape);
      this.state[mName(name)] = zeros();
      this.state[vName(name)] = zeros();
      this.updates.push([name, newName(name)], [mName(name), newMName(name)], [vName(name), newVName(name)]);
    }
  }

  get config() {
    return this.art.config;
  }

  /** hp for the next update from the manifest's AdamW constants (or overrides) and lr. */
  hp(lr, { beta1, beta2, eps, weight_decay } = {}) {
    const c = this.art.config;
    return makeHp(lr, beta1 ?? c.beta1, beta2 ?? c.beta2, eps ?? c.eps, weight_decay ?? c.weight_decay, this.stepCount + 1);
  }

  /**
   * Train on one batch; returns that batch's loss before the update. clip > 0 scales the gradients
   * to a global L2 norm of at most clip before AdamW (0 or Infinity: off); the norm before
   * clipping is then this.lastGradNorm.
   */
  async step(tokens, positions, labels, hp, clip = 0) {
    const b = checkBatch(this.art.config, tokens, positions, labels);
    hp = checkHp(hp, this.stepCount + 1);
    clip = checkClip(clip, InputError);
    const T = this.ort.Tensor;
    const feeds = { ...this.frozen, ...this.state, ...batchFeeds(T, b) };
    feeds[HP_INPUT] = new T('float32', hp, [hp.length]);
    feeds[CLIP_INPUT] = new T('float32', Float32Array.of(clip), []);
    const out = await this.session.run(feeds);
    const loss = Number(out[LOSS_OUTPUT].data[0]);
    this.lastGradNorm = Number(out[GRAD_NORM_OUTPUT].data[0]);
    if (!Number.isFinite(loss)) {
      throw new TrainingDiverged(`loss is ${loss} at step ${this.stepCount + 1}; the update was not applied (parameters and moments stay at step ${this.stepCount})`);
    }
    for (const [input, output] of this.updates) this.state[input] = out[output];
    this.stepCount += 1;
    return loss;
  }

  /** Current parameters {name: Float32Array} in manifest order. */
  async parameters() {
    return Object.fromEntries(this.art.params.map((p) => [p.name, this.state[p.name].data]));
  }

  /** AdamW moments {m: {name: Float32Array}, v: {...}}. */
  moments() {
    const pick = (nameOf) => Object.fromEntries(this.art.params.map((p) => [p.name, this.state[nameOf(p.name)].data]));
    return { m: pick(mName), v: pick(vName) };
  }

  /** Trained weights as safetensors, same keys/shapes/dtype as weights.safetensors. */
  async save(file) {
    checkOutputPath(file, this.art.folder);
    saveSafetensors(file, await this.parameters(), this.art.shapes, { step: String(this.stepCount), host: 'node', runtime: 'onnxruntime-node' });
  }

  async release() {
    await this.session.release?.();
  }
}

// ------------------------------------------------------------- ORT training set (web)
let ortWeb;
/** onnxruntime-web 1.19.2's training build, loaded by file (its package exports hide it from Node). */
export function onnxruntimeWebTraining() {
  if (!ortWeb) {
    const main = require.resolve('onnxruntime-web'); // dist/ort.node.min.js
    ortWeb = require(path.join(path.dirname(main), 'ort.training.wasm.min.js'));
    ortWeb.env.wasm.numThreads = 1; // threads need workers from a file URL; one thread is plenty for the host
    ortWeb.env.logLevel = 'error';
  }
  return ortWeb;
}

/**
 * ONNX Runtime's default learning rate for an optimizer whose checkpoint holds no optimizer
 * state (onnxruntime training_api GroupOptimizerState::initial_lr). onnxruntime-web 1.19.2
 * exposes no SetLearningRate, so this is the only learning rate it trains with.
 */
export const ORT_DEFAULT_LR = 1e-3;

/** onnxruntime-web 1.19.2 TrainingSession on the ORT training set. */
export class TrainingSetTrainer {
  static NEEDS = [...TRAINING_SET_FILES, 'weights.safetensors'];

  static async create(folder) {
    const art = loadArtifacts(folder, TrainingSetTrainer.NEEDS);
    const weights = loadWeights(art);
    const ort = onnxruntimeWebTraining();
    const bytes = (name) => new Uint8Array(art.take(name));
    let session;
    try {
      session = await ort.TrainingSession.create({
        checkpointState: bytes('checkpoint'),
        trainModel: bytes('training_model.onnx'),
        evalModel: bytes('eval_model.onnx'),
        optimizerModel: bytes('optimizer_model.onnx'),
      });
    } catch (e) {
      throw new ArtifactError(`onnxruntime-web could not open the training set in ${folder}: ${e.message}`);
    }
    const t = new TrainingSetTrainer(art, ort, session);
    await t.checkLayout(weights);
    return t;
  }

  constructor(art, ort, session) {
    this.art = art;
    this.ort = ort;
    this.session = session;
    this.stepCount = 0;
    for (const n of BATCH_INPUTS) {
      if (!session.trainingInputNames.includes(n)) throw new ArtifactError(`training_model.onnx takes no input ${n} (inputs: ${session.trainingInputNames})`);
    }
  }

  /** The session's contiguous parameter buffer must be the manifest's parameters in order,
   *  equal to weights.safetensors: then parameters() can split it by manifest shapes. */
  async checkLayout(weights) {
    const total = this.art.params.reduce((s, p) => s + numel(p.shape), 0);
    const size = await this.session.getParametersSize(true);
    if (size !== total) throw new ArtifactError(`the training set holds ${size} trainable values, manifest.json's parameters ${total}`);
    const flat = await this.parameters();
    for (const p of this.art.params) {
      const a = flat[p.name];
      const w = weights[p.name];
      for (let i = 0; i < a.length; i++) {
        if (a[i] !== w[i]) throw new ArtifactError(`checkpoint's parameter ${p.name} differs from weights.safetensors at [${unravel(i, p.shape)}] (${a[i]} vs ${w[i]}): checkpoint from another build, or parameter order differs from the manifest`);
      }
    }
  }

  get config() {
    return this.art.config;
  }

  hp(lr = ORT_DEFAULT_LR) {
    const c = this.art.config;
    return makeHp(lr, c.beta1, c.beta2, c.eps, c.weight_decay, this.stepCount + 1);
  }

  /** optimizer_model.onnx fixes beta1/beta2/eps/weight decay at build time, and
   *  onnxruntime-web fixes lr: hp must agree with both. */
  checkHpSupported(hp) {
    const c = this.art.config;
    const lr32 = Math.fround(ORT_DEFAULT_LR);
    if (hp[0] !== lr32) {
      throw new InputError(
        `hp[0] (lr) = ${hp[0]}, but the ORT training set under onnxruntime-web 1.19.2 trains at lr ${ORT_DEFAULT_LR} only ` +
          `(its training API has no SetLearningRate; ONNX Runtime starts the optimizer at ${ORT_DEFAULT_LR}); use lr ${ORT_DEFAULT_LR}, ` +
          `or train train_step.onnx (without --training-set), which reads all seven hp values every step`,
      );
    }
    for (let i = 1; i < 5; i++) {
      const key = HP_LAYOUT[i];
      const built = Math.fround(c[key]);
      if (Math.abs(hp[i] - built) > 1e-6 * Math.max(Math.abs(built), 1e-30)) {
        throw new InputError(`hp[${i}] (${key}) = ${hp[i]}, but optimizer_model.onnx was built with ${key}=${c[key]}: the optimizer model fixes it when built; rebuild the artifacts or train train_step.onnx instead`);
      }
    }
  }

  /** As PortableTrainer.step; the clipping threshold is fixed in the optimizer model, so clip must be the built one. */
  async step(tokens, positions, labels, hp, clip = this.art.config.clip ?? 0) {
    const b = checkBatch(this.art.config, tokens, positions, labels);
    hp = checkHp(hp, this.stepCount + 1);
    this.checkHpSupported(hp);
    const built = this.art.config.clip ?? 0;
    const fed = checkClip(clip, InputError) === Infinity ? 0 : Math.fround(clip);
    if (Math.abs(fed - Math.fround(built)) > 1e-6 * Math.max(built, 1e-30)) {
      throw new InputError(`clip = ${clip}, but optimizer_model.onnx was built with clip=${built} (0: off): the optimizer model fixes it when built; rebuild the artifacts with --clip or train train_step.onnx instead`);
    }
    const out = await this.session.runTrainStep(batchFeeds(this.ort.Tensor, b));
    const loss = Number(out[this.session.trainingOutputNames[0]].data[0]);
    if (!Number.isFinite(loss)) {
      await this.session.lazyResetGrad();
      throw new TrainingDiverged(`loss is ${loss} at step ${this.stepCount + 1}; the update was not applied`);
    }
    await this.session.runOptimizerStep();
    await this.session.lazyResetGrad();
    this.stepCount += 1;
    return loss;
  }

  async parameters() {
    const buf = await this.session.getContiguousParameters(true);
    const flat = buf.data;
    const out = {};
    let off = 0;
    for (const p of this.art.params) {
      const n = numel(p.shape);
      out[p.name] = Float32Array.from(flat.subarray(off, off + n));
      off += n;
    }
    return out;
  }

  async save(file) {
    checkOutputPath(file, this.art.folder);
    saveSafetensors(file, await this.parameters(), this.art.shapes, { step: String(this.stepCount), host: 'node', runtime: 'onnxruntime-web-training' });
  }

  async release() {
    await this.session.release();
  }
}

// ------------------------------------------------------------------ batch files (Python)
/**
 * Read a batch file written by `python -m runtimes.batchfile` (hosts/common/batches.mjs
 * readBatches; problems are DataError): checked against the artifacts' config.
 * Returns {n, batch, seq, hp: {lr, beta1, beta2, eps, weight_decay} (undefined where the file
 * has none), metadata, get(i) -> {tokens, positions, labels}}.
 */
export function readBatchFile(file, config) {
  let bytes;
  try {
    bytes = readFileSync(file);
  } catch (e) {
    throw new DataError(`cannot read ${file}: ${e.code === 'ENOENT' ? 'no such file' : e.message}`);
  }
  return readBatches(bytes, config, file, DataError);
}

// ------------------------------------------------------------------- simple samplers
/** Random windows of a byte array (hosts/common/samplers.mjs byteSampler; a text too short is DataError). */
export function byteSampler(bytes, batch, seq, seed) {
  return commonByteSampler(bytes, batch, seq, seed, DataError);
}

/** The same windows over a tokenizer's ids of a text (hosts/common/samplers.mjs tokenSampler). */
export function tokenSampler(ids, batch, seq, seed) {
  return commonTokenSampler(ids, batch, seq, seed, DataError);
}
