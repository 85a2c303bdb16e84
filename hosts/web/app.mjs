// The browser host: trains GPT-2 ONNX artifacts in the tab with onnxruntime-web.
//
// URL parameters (all optional):
//   artifacts=/artifacts/tiny   artifact folder (manifest.json, weights.safetensors, train_step.onnx, forward.onnx;
//                               a LoRA folder's base.safetensors too: its frozen base weights, fed at every step)
//   batches=URL                 train on exactly these batches (JSON or safetensors, see hosts/common/batches.mjs);
//                               otherwise random windows of the bundled text (corpus=URL, default ./corpus.txt)
//   batch=4 seq=<context> seed=0 lr=1e-3 steps=<N>   for the text mode (steps: stop after N; default: until Stop)
//   clip=C                      global gradient-norm clipping before AdamW (0: off; default 1 in the text mode,
//                               0 with batches=, whose file carries no threshold)
//   ep=auto|wasm|webgpu         execution provider (auto: WebGPU when an adapter exists and the session starts)
//   placements=1                (with WebGPU) record which ops run on wasm in window.placements; verbose logging
//   threads=N                   wasm threads (default: every core, navigator.hardwareConcurrency, when the page
//                               is cross-origin isolated; else 1)
//   prompt="The " gen=200 temperature=0 sample_seed=0   text generated after training (temperature 0: greedy)
//
// The text mode trains on the text's bytes, or, where the manifest's tokenizer is "huggingface", on the ids
// of the folder's tokenizer.json (hosts/common/tokenizer.mjs with @huggingface/tokenizers, served at
// /tokenizers/); the sample's prompt is encoded and its tokens decoded the same way.
//
// For tests: window.trainLog = [{step, loss, grad_norm, ms}], window.trainDone (true once training stopped and the
// sample is shown), window.sample = {tokens, promptLength, text}, window.trainError (message) on failure,
// window.exportWeights() -> the bytes the Export button downloads (weights.safetensors: the trained parameters,
// which in a LoRA folder are the adapters alone; null before step 1).
//
// The page is served at /, this module at /hosts/web/app.mjs; the contract code shared with hosts/node is
// imported from /hosts/common/ (serve.mjs mounts it there).

import { denseLabels, readBatches } from '/hosts/common/batches.mjs';
import {
  CLIP_INPUT, GRAD_NORM_OUTPUT, HP_INPUT, LOGITS_OUTPUT, LOSS_OUTPUT, mName, newMName, newName, newVName, trainStepInputs, vName,
} from '/hosts/common/contract.mjs';
import { checkAdamW, checkClip, makeHp } from '/hosts/common/hp.mjs';
import { frozenFeeds, weightsFor } from '/hosts/common/manifest.mjs';
import { encodeSafetensors, parseSafetensors } from '/hosts/common/safetensors.mjs';
import { byteSampler, mulberry32, tokenSampler } from '/hosts/common/samplers.mjs';
import { TOKENIZER_FILE, decodeText, makeTokenizer } from '/hosts/common/tokenizer.mjs';
import { Tokenizer } from '/tokenizers/tokenizers.min.mjs';
import { argmax, checkFile, parsePlacements, readManifest, sampleLogits, sha256Hex } from './lib.mjs';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const ORT_BASE = new URL('/ort/', location.href).href;

window.trainLog = [];
window.trainDone = false;
window.trainError = null;
window.sample = null;
window.exportWeights = () => null; // replaced once the trainer exists
window.placements = null; // with ?placements=1 and WebGPU: {provider: {opType: count}} of train_step.onnx

// ------------------------------------------------------------------ URL parameters and files
function intParam(name, dflt, lo, hi) {
  const raw = params.get(name);
  if (raw === null || raw === '') return dflt;
  const v = Number(raw);
  if (!Number.isInteger(v) || v < lo || v > hi) throw new Error(`?${name}=${raw}: expected an integer in [${lo}, ${hi}]`);
  return v;
}

function numParam(name, dflt, ok, range) {
  const raw = params.get(name);
  if (raw === null || raw === '') return dflt;
  const v = Number(raw);
  if (!Number.isFinite(v) || !ok(v)) throw new Error(`?${name}=${raw}: expected ${range}`);
  return v;
}

async function fetchOk(url) {
  let res;
  try {
    res = await fetch(url);
  } catch (e) {
    throw new Error(`GET ${url} failed: ${e.message}`);
  }
  if (!res.ok) throw new Error(`GET ${url}: HTTP ${res.status} ${res.statusText}`);
  return res;
}
const fetchBytes = async (url) => new Uint8Array(await (await fetchOk(url)).arrayBuffer());

/** A file of the artifact folder, checked against the manifest (readManifest checked the entry's
 *  form); an ONNX model must also hold all its data, before any session opens it. */
async function verified(base, name, files) {
  if (!Object.prototype.hasOwnProperty.call(files, name)) throw new Error(`${base}/manifest.json lists no file ${name}`);
  const bytes = await fetchBytes(`${base}/${name}`);
  return checkFile(name, bytes, files[name], await sha256Hex(bytes), `${base}/${name}`);
}

// ------------------------------------------------------------------ data
/** The manifest's AdamW constants (makeHp's defaults where it has none) and the learning rate. */
function adamw(config, lr) {
  return checkAdamW({
    lr, beta1: config.beta1 ?? 0.9, beta2: config.beta2 ?? 0.999, eps: config.eps ?? 1e-8,
    weight_decay: config.weight_decay ?? 0.01,
  }, 'hyperparameters');
}

/**
 * The training data: exactly the batches of ?batches=, or random windows of a text.
 * Returns {next(i) -> batch i, totalSteps, batch, seq, hp, clip, note}.
 */
async function loadData(config, tok) {
  const batchesUrl = params.get('batches');
  if (batchesUrl) {
    ui.status(`loading batches ${batchesUrl} …`);
    const res = await fetchOk(batchesUrl);
    const isJson = /\.json($|\?)/.test(batchesUrl) || (res.headers.get('content-type') || '').includes('json');
    const src = isJson ? await res.json() : await res.arrayBuffer();
    const batches = readBatches(src, config, batchesUrl);
    return {
      next: (i) => batches.get(i),
      totalSteps: batches.n,
      batch: batches.batch,
      seq: batches.seq,
      hp: { ...adamw(config, 1e-3), ...batches.hp }, // the file's values where it has them
      clip: checkClip(numParam('clip', 0, (v) => v >= 0, 'a number >= 0')),
      note: `${batches.n} batches from ${batchesUrl}`,
    };
  }
  const corpusUrl = params.get('corpus') || './corpus.txt';
  const text = new Uint8Array(await (await fetchOk(corpusUrl)).arrayBuffer());
  const batch = intParam('batch', 4, 1, 1024);
  const seq = intParam('seq', config.context, 1, config.context);
  const seed = intParam('seed', 0, 0, 2 ** 32 - 1);
  const steps = intParam('steps', 0, 0, 1e9); // 0: until Stop
  const hp = adamw(config, numParam('lr', 1e-3, (v) => v >= 0, 'a number >= 0'));
  const clip = checkClip(numParam('clip', 1, (v) => v >= 0, 'a number >= 0'));
  let draw, what = `${text.length} bytes`;
  if (tok.kind === 'bytes') {
    draw = byteSampler(text, batch, seq, seed);
  } else {
    const ids = tok.encode(decodeText(text));
    draw = tokenSampler(ids, batch, seq, seed);
    what += `, ${ids.length} tokens of ${TOKENIZER_FILE}`;
  }
  return {
    next: () => draw(),
    totalSteps: steps > 0 ? steps : Infinity,
    batch,
    seq,
    hp,
    clip,
    note: `random ${batch}x${seq} windows of ${corpusUrl} (${what}, seed ${seed})`,
  };
}

/** What to generate after training: the prompt= gen= temperature= sample_seed= parameters. */
function sampleOptions() {
  return {
    prompt: params.get('prompt') ?? 'The ',
    n: intParam('gen', 200, 0, 10000),
    temperature: numParam('temperature', 0, (v) => v >= 0, 'a number >= 0'),
    rand: mulberry32(intParam('sample_seed', 0, 0, 2 ** 32 - 1)),
  };
}

// ------------------------------------------------------------------ model
/** manifest.json of the artifact folder, checked: {base, json (the manifest), config, plist, frozen, frozenFile,
 *  counts, files, tokenizer (its entry)} (lib.mjs readManifest). */
async function loadManifest(base) {
  ui.status(`loading ${base}/manifest.json …`);
  const { params: plist, ...rest } = readManifest(await (await fetchOk(`${base}/manifest.json`)).json(), `${base}/manifest.json`);
  return { base, plist, ...rest };
}

/** The folder's tokenizer (hosts/common/tokenizer.mjs): bytes, or its tokenizer.json, verified first. */
async function loadTokenizer({ base, files, tokenizer }) {
  if (tokenizer.kind === 'bytes') return makeTokenizer(tokenizer);
  ui.status(`loading ${base}/${TOKENIZER_FILE} …`);
  const json = await verified(base, TOKENIZER_FILE, files);
  return makeTokenizer(tokenizer, { json, Tokenizer, where: `${base}/${TOKENIZER_FILE}` });
}

/** The initial weights, a LoRA folder's base weights and a train_step.onnx session, all verified
 *  against the manifest: {...manifest, weights: {name: Float32Array}, baseFeeds: {name: Tensor} (the
 *  frozen inputs, fed at every step and never updated; {} for a full folder), rt (startOrt's),
 *  forward: null}. */
async function openModel(manifest) {
  const { base, plist, frozen, frozenFile, files } = manifest;
  ui.status(`loading weights${frozenFile ? `, ${frozenFile}` : ''} and train_step.onnx …`);
  const [weightBytes, stepBytes, baseBytes] = await Promise.all([
    verified(base, 'weights.safetensors', files),
    verified(base, 'train_step.onnx', files),
    frozenFile ? verified(base, frozenFile, files) : null,
  ]);
  const weights = weightsFor(plist, parseSafetensors(weightBytes, 'weights.safetensors').tensors);
  ui.status('starting onnxruntime-web …');
  const rt = await startOrt(stepBytes, params.get('ep') || 'auto');
  // Built once: the same tensors go into every step and every sample.
  const baseFeeds = frozenFeeds(rt.ort.Tensor, manifest.json, baseBytes, frozenFile);
  const expected = trainStepInputs(plist, frozen);
  const got = rt.session.inputNames;
  if (got.join('\n') !== expected.join('\n')) {
    throw new Error(`train_step.onnx inputs [${got.slice(0, 4).join(', ')}, …] (${got.length}) differ from the manifest's order (${expected.length})`);
  }
  return { ...manifest, weights, baseFeeds, rt, forward: null };
}

/**
 * `n` tokens (bytes, on a byte folder) generated by forward.onnx (verified and opened on first use)
 * from parameters `weights` (tensors in manifest order), greedy or sampled; the prompt is encoded by
 * the folder's tokenizer, whose ids alone are drawn (the embedding may have padding rows beyond them,
 * which decode to nothing), as runtimes train's sample does. Returns {tokens, promptLength}.
 */
async function generate(model, weights, { prompt, n, temperature, rand }) {
  const { ort } = model.rt;
  const V = model.config.vocab, C = model.config.context;
  if (!model.forward) {
    const fwdBytes = await verified(model.base, 'forward.onnx', model.files);
    model.forward = await ort.InferenceSession.create(fwdBytes, model.rt.options);
  }
  const { tok } = model;
  const tokens = tok.encode(prompt);
  if (tokens.length === 0) tokens.push(...tok.encode('\n')); // start from a newline when the prompt is empty
  const promptLength = tokens.length;
  const limit = tok.kind === 'bytes' ? V : tok.vocabSize;
  for (let i = 0; i < n; i++) {
    const ctx = tokens.slice(-C);
    const feeds = { ...model.baseFeeds };
    model.plist.forEach(({ name }, k) => { feeds[name] = weights[k]; });
    feeds.tokens = new ort.Tensor('int64', BigInt64Array.from(ctx, BigInt), [1, ctx.length]);
    feeds.positions = new ort.Tensor('int64', BigInt64Array.from(ctx, (_, j) => BigInt(j)), [1, ctx.length]);
    const logits = (await model.forward.run(feeds))[LOGITS_OUTPUT];
    if (i % 16 === 15) await yieldToBrowser();
    const start = (ctx.length - 1) * V;
    tokens.push(temperature === 0
      ? argmax(logits.data, start, start + limit)
      : sampleLogits(logits.data, start, start + limit, temperature, rand()));
  }
  return { tokens, promptLength };
}

// ------------------------------------------------------------------ onnxruntime-web
async function webgpuUsable() {
  if (!navigator.gpu) return false;
  try {
    return !!(await navigator.gpu.requestAdapter());
  } catch {
    return false;
  }
}

/**
 * Run `create` (a session creation) with onnxruntime's verbose log captured rather than printed,
 * and publish which provider runs which op as window.placements ({provider: {opType: count}}):
 * with ?placements=1 the page lists the train_step ops WebGPU leaves to wasm. The log level
 * is process-wide in onnxruntime-web, so every later run logs verbosely too: a diagnostic mode.
 */
async function withPlacements(create) {
  const lines = [];
  const saved = {};
  for (const k of ['log', 'info', 'warn', 'error', 'debug']) {
    saved[k] = console[k];
    console[k] = (...a) => { lines.push(a.join(' ')); };
  }
  let session;
  try {
    session = await create();
  } finally {
    Object.assign(console, saved);
  }
  window.placements = parsePlacements(lines);
  const onWasm = Object.entries(window.placements.CPUExecutionProvider || {}).map(([op, n]) => `${op} ×${n}`);
  console.info(`train_step ops on wasm: ${onWasm.join(', ') || 'none'}`);
  for (const k of ['log', 'info', 'debug']) console[k] = () => {}; // the per-run verbose flood
  return session;
}

/** Import onnxruntime-web and create the train_step session: WebGPU if asked/available, else wasm. */
async function startOrt(modelBytes, epParam) {
  if (!['auto', 'wasm', 'webgpu'].includes(epParam)) throw new Error(`?ep=${epParam}: expected auto, wasm or webgpu`);
  const tryGpu = epParam === 'webgpu' || (epParam === 'auto' && (await webgpuUsable()));
  if (epParam === 'webgpu' && !tryGpu) throw new Error('?ep=webgpu, but this browser has no usable WebGPU adapter');
  // ort.webgpu.min.mjs: onnxruntime's native WebGPU provider (and wasm). Not ort.min.mjs, whose
  // older JavaScript WebGPU provider (JSEP) computes train_step.onnx wrong in onnxruntime-web
  // 1.30: its position-embedding Gather returns wpe's last element everywhere (forward.onnx
  // alone is right), 0.14% off in the first loss and 24% in the gradient norm.
  // ort.wasm.min.mjs (smaller) carries only wasm.
  const ort = await import(ORT_BASE + (tryGpu ? 'ort.webgpu.min.mjs' : 'ort.wasm.min.mjs'));
  const isolated = globalThis.crossOriginIsolated === true;
  // Every core: a training tab is the machine's work while it runs (?threads=N to leave room).
  const maxThreads = isolated ? Math.max(1, navigator.hardwareConcurrency || 1) : 1;
  const threads = intParam('threads', maxThreads, 1, 64);
  if (threads > 1 && !isolated) throw new Error(`?threads=${threads} needs a cross-origin isolated page (COOP/COEP headers; serve.mjs sends them)`);
  ort.env.wasm.numThreads = threads;
  ort.env.wasm.wasmPaths = ORT_BASE;
  const placements = params.get('placements') === '1';
  ort.env.logLevel = placements ? 'verbose' : 'warning';
  const options = { graphOptimizationLevel: 'all', executionMode: 'sequential' };
  if (tryGpu) {
    try {
      const gpuOptions = { ...options, executionProviders: ['webgpu', 'wasm'] };
      const session = placements
        ? await withPlacements(() => ort.InferenceSession.create(modelBytes, { ...gpuOptions, logSeverityLevel: 0, logVerbosityLevel: 0 }))
        : await ort.InferenceSession.create(modelBytes, gpuOptions);
      return { ort, session, ep: 'webgpu', threads, options: gpuOptions };
    } catch (e) {
      if (epParam === 'webgpu') throw e;
      console.warn(`WebGPU session failed, falling back to wasm: ${e.message}`);
    }
  }
  const wasmOptions = { ...options, executionProviders: ['wasm'] };
  const session = await ort.InferenceSession.create(modelBytes, wasmOptions);
  return { ort, session, ep: 'wasm', threads, options: wasmOptions };
}

// ------------------------------------------------------------------ trainer
/** train_step.onnx in the tab: parameters and AdamW moments live here between steps. */
class Trainer {
  constructor(model, data) {
    this.model = model;
    this.data = data;
    const names = model.plist.map((p) => p.name);
    this.state = {
      p: names.map((n) => model.weights[n]),
      m: names.map((n) => new Float32Array(model.weights[n].length)),
      v: names.map((n) => new Float32Array(model.weights[n].length)),
    };
    this.step = 0; // updates applied
    this.gradNorm = null; // global gradient norm of the last step, before clipping
    this.trainMs = 0;
  }

  /** Parameters (or moments: state.m, state.v) as onnxruntime tensors in manifest order. */
  tensors(arrays = this.state.p) {
    const { ort } = this.model.rt;
    return arrays.map((a, i) => new ort.Tensor('float32', a, this.model.plist[i].shape));
  }

  /** One update on the next batch; returns that batch's loss before the update. */
  async trainStep() {
    const { rt: { ort, session }, plist, config } = this.model;
    const { hp, clip } = this.data;
    const { tokens, positions, labels } = this.data.next(this.step);
    const feeds = { ...this.model.baseFeeds }; // a LoRA folder's base: read, never replaced
    const pt = this.tensors(this.state.p), mt = this.tensors(this.state.m), vt = this.tensors(this.state.v);
    plist.forEach(({ name }, i) => {
      feeds[name] = pt[i];
      feeds[mName(name)] = mt[i];
      feeds[vName(name)] = vt[i];
    });
    feeds.tokens = new ort.Tensor('int64', tokens.data, tokens.dims);
    feeds.positions = new ort.Tensor('int64', positions.data, positions.dims);
    if (config.labels === 'dense') {
      const dense = denseLabels(labels, config.vocab);
      feeds.labels = new ort.Tensor('float32', dense.data, dense.dims);
    } else {
      feeds.labels = new ort.Tensor('int64', labels.data, labels.dims);
    }
    const vector = makeHp(hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, this.step + 1);
    feeds[HP_INPUT] = new ort.Tensor('float32', vector, [vector.length]);
    feeds[CLIP_INPUT] = new ort.Tensor('float32', Float32Array.of(clip), []);
    const out = await session.run(feeds);
    const loss = Number(out[LOSS_OUTPUT].data[0]);
    this.gradNorm = Number(out[GRAD_NORM_OUTPUT].data[0]);
    if (!Number.isFinite(loss)) {
      throw new Error(`loss is ${loss} at step ${this.step + 1}; the update was not applied (state stays at step ${this.step})`);
    }
    const take = (nameOf) => plist.map(({ name }) => out[nameOf(name)].data);
    this.state = { p: take(newName), m: take(newMName), v: take(newVName) };
    this.step += 1;
    return loss;
  }

  /** The current parameters as safetensors bytes, laid out like the artifact folder's
   *  weights.safetensors (manifest names and shapes, F32), so `python -m runtimes export
   *  --weights` and the other hosts read it as they read that file. In a LoRA folder these are
   *  the adapters: the trained model is them with the folder's base.safetensors, which training
   *  leaves as it is, and `runtimes export --weights ... --artifacts FOLDER` merges the two. */
  weightsFile() {
    const tensors = {};
    this.model.plist.forEach(({ name, shape }, i) => { tensors[name] = { data: this.state.p[i], shape }; });
    return encodeSafetensors(tensors, { step: String(this.step), host: 'web', runtime: 'onnxruntime-web' });
  }
}

/** Download `bytes` as a file named `name` through a Blob URL and a temporary <a download>. */
function download(bytes, name) {
  const url = URL.createObjectURL(new Blob([bytes], { type: 'application/octet-stream' }));
  const a = document.createElement('a');
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  // The click only starts the download; revoking at once can cancel it in some browsers.
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

// Between steps, give the browser a task boundary so clicks (Stop), painting and other tasks
// get in: awaiting session.run alone only yields microtasks.
const yieldToBrowser = () => new Promise((resolve) => setTimeout(resolve, 0));

// ------------------------------------------------------------------ loss chart
function drawChart(log) {
  const canvas = $('chart');
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const g = canvas.getContext('2d');
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const pad = { l: 56, r: 14, t: 14, b: 34 };
  const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
  g.font = '12px "DejaVu Sans", sans-serif';
  g.strokeStyle = '#d0d7de';
  g.fillStyle = '#57606a';
  g.lineWidth = 1;
  g.strokeRect(pad.l + 0.5, pad.t + 0.5, pw, ph);
  if (log.length === 0) {
    g.fillText('loss per step appears here', pad.l + 12, pad.t + 22);
    return;
  }
  let lo = Infinity, hi = -Infinity;
  for (const { loss } of log) { lo = Math.min(lo, loss); hi = Math.max(hi, loss); }
  if (hi - lo < 1e-6) { hi += 0.5; lo -= 0.5; }
  const margin = (hi - lo) * 0.05;
  lo -= margin; hi += margin;
  const last = log[log.length - 1].step, first = log[0].step;
  const span = Math.max(1, last - first);
  const x = (s) => pad.l + ((s - first) / span) * pw;
  const y = (v) => pad.t + (1 - (v - lo) / (hi - lo)) * ph;
  // grid and labels: 5 horizontal lines
  g.textAlign = 'right';
  g.textBaseline = 'middle';
  for (let i = 0; i <= 4; i++) {
    const v = lo + ((hi - lo) * i) / 4;
    const yy = Math.round(y(v)) + 0.5;
    g.strokeStyle = '#eaeef2';
    g.beginPath(); g.moveTo(pad.l, yy); g.lineTo(pad.l + pw, yy); g.stroke();
    g.fillText(v.toFixed(3), pad.l - 6, yy);
  }
  g.textAlign = 'center';
  g.textBaseline = 'top';
  for (let i = 0; i <= 4; i++) {
    const s = Math.round(first + (span * i) / 4);
    g.fillText(String(s), x(s), pad.t + ph + 6);
  }
  g.fillText('step', pad.l + pw / 2, pad.t + ph + 20);
  // raw losses
  g.strokeStyle = log.length > 200 ? 'rgba(31,111,235,0.35)' : '#1f6feb';
  g.lineWidth = 1.5;
  g.beginPath();
  log.forEach(({ step, loss }, i) => (i ? g.lineTo(x(step), y(loss)) : g.moveTo(x(step), y(loss))));
  g.stroke();
  if (log.length === 1) {
    g.fillStyle = '#1f6feb';
    g.beginPath(); g.arc(x(first), y(log[0].loss), 3, 0, 2 * Math.PI); g.fill();
  }
  // moving average for long runs
  if (log.length > 200) {
    const k = Math.max(5, Math.round(log.length / 50));
    g.strokeStyle = '#0a3069';
    g.lineWidth = 2;
    g.beginPath();
    let sum = 0;
    log.forEach(({ step, loss }, i) => {
      sum += loss;
      if (i >= k) sum -= log[i - k].loss;
      const avg = sum / Math.min(i + 1, k);
      i ? g.lineTo(x(step), y(avg)) : g.moveTo(x(step), y(avg));
    });
    g.stroke();
  }
}

let chartPending = false;
function scheduleChart() {
  if (chartPending) return;
  chartPending = true;
  requestAnimationFrame(() => {
    chartPending = false;
    drawChart(window.trainLog);
  });
}

// ------------------------------------------------------------------ view
const ui = {
  button: $('start'),
  status(msg, isError = false) {
    $('status').textContent = msg;
    $('status').className = isError ? 'error' : '';
  },
};

function fail(err) {
  const msg = err && err.message ? err.message : String(err);
  console.error(err);
  window.trainError = msg;
  ui.status(`error: ${msg}`, true);
  ui.button.disabled = true;
  ui.button.classList.remove('stop');
  ui.button.textContent = 'Start';
}

const grouped = (n) => n.toLocaleString('en-US');

/** How many weights the page trains: "0.13M parameters", or on a LoRA folder (which trains its
 *  adapters alone) `runtimes train`'s wording, "8,192 of 128,768 parameters trained". */
function parameterSummary({ frozen, counts: [trained, total] }) {
  return frozen.length ? `${grouped(trained)} of ${grouped(total)} parameters trained` : `${(total / 1e6).toFixed(2)}M parameters`;
}

/** The backend and the one-line summary of model, data and hyperparameters. */
function showSetup(model, data) {
  const { base, config, rt } = model;
  const { hp, clip } = data;
  $('backend').textContent = `${rt.ep}${rt.ep === 'wasm' ? ` ×${rt.threads}` : ''}`;
  $('info').textContent =
    `${base}: d_model ${config.d_model}, ${config.n_layers} layers, context ${config.context}, vocab ${config.vocab}, ` +
    `tokenizer ${model.tok.kind}, ` +
    `${parameterSummary(model)}, ${config.labels} labels · data: ${data.note} · ` +
    `lr ${hp.lr}, betas (${hp.beta1}, ${hp.beta2}), eps ${hp.eps}, wd ${hp.weight_decay}, ` +
    `clip ${clip > 0 && clip < Infinity ? clip : 'off'} · ` +
    `onnxruntime-web ${rt.ort.env.versions ? rt.ort.env.versions.web || rt.ort.env.versions.common : ''}, ` +
    `cross-origin isolated: ${globalThis.crossOriginIsolated === true}`;
}

function showStats(trainer, loss) {
  const { step, trainMs } = trainer;
  $('step').textContent = String(step);
  $('export').disabled = step < 1;
  $('loss').textContent = loss.toFixed(4);
  if (trainMs > 0) $('tps').textContent = Math.round((step * trainer.data.batch * trainer.data.seq) / (trainMs / 1000)).toLocaleString('en-US');
  scheduleChart();
}

/** The generated text (the prompt highlighted) and window.sample. */
function showSample({ tokens, promptLength }, step, { n, temperature }, tok) {
  const text = tok.decode(tokens);
  const sampleEl = $('sample');
  sampleEl.textContent = '';
  const head = document.createElement('span');
  head.className = 'prompt';
  head.textContent = tok.decode(tokens.slice(0, promptLength));
  sampleEl.append(head, tok.decode(tokens.slice(promptLength)));
  const unit = tok.kind === 'bytes' ? 'bytes' : `tokens (${TOKENIZER_FILE})`;
  $('sample-info').textContent = `${n} ${unit} after step ${step}, ${temperature === 0 ? 'greedy' : `temperature ${temperature}`}, forward.onnx`;
  window.sample = { tokens, promptLength, text, step, temperature };
}

// ------------------------------------------------------------------ Start / Stop
/** The Start/Stop button: train until Stop or the last step, then show a sample; Start continues. */
function wireButton(trainer) {
  const { model, data } = trainer;
  let running = false;

  async function run() {
    running = true;
    window.trainDone = false;
    ui.button.textContent = 'Stop';
    ui.button.classList.add('stop');
    // A LoRA folder's status names the share it trains, as `runtimes train`'s progress bar does.
    const share = model.frozen.length ? ` ${grouped(model.counts[0])}/${grouped(model.counts[1])}` : '';
    ui.status(`training${share}: ${data.note}`);
    try {
      while (running && trainer.step < data.totalSteps) {
        const t0 = performance.now();
        const loss = await trainer.trainStep();
        const ms = performance.now() - t0;
        trainer.trainMs += ms;
        window.trainLog.push({ step: trainer.step, loss, grad_norm: trainer.gradNorm, ms });
        showStats(trainer, loss);
        await yieldToBrowser();
      }
      running = false;
      ui.button.disabled = true;
      ui.button.classList.remove('stop');
      ui.status(`stopped after step ${trainer.step}; generating a sample …`);
      const options = sampleOptions();
      showSample(await generate(model, trainer.tensors(), options), trainer.step, options, model.tok);
      const left = data.totalSteps - trainer.step;
      ui.button.textContent = left > 0 ? 'Start' : 'Done';
      ui.button.disabled = !(left > 0);
      ui.status(`stopped after step ${trainer.step}${left > 0 ? '; Start continues' : ` (all ${data.totalSteps} steps done)`}`);
      window.trainDone = true;
    } catch (e) {
      running = false;
      fail(e);
    }
  }

  ui.button.addEventListener('click', () => {
    if (running) {
      running = false; // the loop stops after the step in flight
      ui.button.disabled = true;
      ui.status('stopping after this step …');
    } else if (!ui.button.disabled) {
      run();
    }
  });
  ui.button.disabled = false;
}

/** The Export button: the weights after the last completed step. The trainer swaps its whole
 *  state object per step, so an export during training is one consistent step's weights. A LoRA
 *  folder's export is its adapters (Trainer.weightsFile), and the button and status say so. */
function wireExport(trainer) {
  const { frozen, frozenFile } = trainer.model;
  window.exportWeights = () => (trainer.step > 0 ? trainer.weightsFile() : null);
  if (frozen.length) $('export').title = `download the trained adapters as weights.safetensors (the base weights stay the folder's ${frozenFile})`;
  $('export').addEventListener('click', () => {
    if (trainer.step < 1) return;
    try {
      download(trainer.weightsFile(), 'weights.safetensors');
      ui.status(frozen.length
        ? `exported the adapters as weights.safetensors (step ${trainer.step}); the base weights stay the folder's ${frozenFile}`
        : `exported weights.safetensors (step ${trainer.step})`);
    } catch (e) {
      ui.status(`export failed: ${e.message}`, true);
    }
  });
}

// ------------------------------------------------------------------ main
async function main() {
  const base = (params.get('artifacts') || '/artifacts/tiny').replace(/\/+$/, '');
  const manifest = await loadManifest(base);
  const tok = await loadTokenizer(manifest);
  const data = await loadData(manifest.config, tok);
  const model = { ...(await openModel(manifest)), tok };
  showSetup(model, data);
  const trainer = new Trainer(model, data);
  wireButton(trainer);
  wireExport(trainer);
  drawChart(window.trainLog);
  window.addEventListener('resize', scheduleChart);
  ui.status(`ready: ${data.note}${Number.isFinite(data.totalSteps) ? `, ${data.totalSteps} steps` : ''}. Press Start.`);
}

main().catch(fail);
