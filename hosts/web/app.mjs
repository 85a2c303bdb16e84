// The browser host: trains GPT-2 ONNX artifacts in the tab with onnxruntime-web.
//
// URL parameters (all optional):
//   artifacts=/artifacts/tiny   artifact folder (manifest.json, weights.safetensors, train_step.onnx, forward.onnx)
//   batches=URL                 train on exactly these batches (JSON or safetensors, see lib.mjs readBatches);
//                               otherwise random windows of the bundled text (corpus=URL, default ./corpus.txt)
//   batch=4 seq=<context> seed=0 lr=1e-3 steps=<N>   for the text mode (steps: stop after N; default: until Stop)
//   clip=C                      global gradient-norm clipping before AdamW (0: off; default 1 in the text mode,
//                               0 with batches=, whose file carries no threshold)
//   ep=auto|wasm|webgpu         execution provider (auto: WebGPU when an adapter exists and the session starts)
//   threads=N                   wasm threads (default: half the cores, at most 4, when the page is cross-origin
//                               isolated; else 1)
//   prompt="The " gen=200 temperature=0 sample_seed=0   text generated after training (temperature 0: greedy)
//
// For tests: window.trainLog = [{step, loss, grad_norm}], window.trainDone (true once training stopped and the
// sample is shown), window.sample = {tokens, promptLength, text}, window.trainError (message) on failure.

import {
  argmax, batchAt, byteSampler, checkHp, checkSelfContained, denseLabels, makeHp, parseSafetensors,
  readBatches, readManifest, sampleLogits, sha256Hex, trainStepInputs, weightsFor, mulberry32, checkClip,
} from './lib.mjs';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const ORT_BASE = new URL('/ort/', location.href).href;

window.trainLog = [];
window.trainDone = false;
window.trainError = null;
window.sample = null;

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
 *  form); an ONNX model must also hold all its data (checkSelfContained), before any session. */
async function verified(base, name, files) {
  if (!Object.prototype.hasOwnProperty.call(files, name)) throw new Error(`${base}/manifest.json lists no file ${name}`);
  const entry = files[name];
  const bytes = await fetchBytes(`${base}/${name}`);
  if (entry.bytes !== bytes.byteLength) {
    throw new Error(`${name}: ${bytes.byteLength} bytes, the manifest says ${entry.bytes}`);
  }
  const digest = await sha256Hex(bytes);
  if (digest === null) console.warn(`${name}: not a secure context (no WebCrypto); sha256 not checked`);
  if (digest !== null && digest !== entry.sha256) throw new Error(`${name}: sha256 ${digest} does not match the manifest's ${entry.sha256}`);
  if (name.endsWith('.onnx')) checkSelfContained(bytes, `${base}/${name}`);
  return bytes;
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

/** Import onnxruntime-web and create the train_step session: WebGPU if asked/available, else wasm. */
async function startOrt(modelBytes, epParam) {
  if (!['auto', 'wasm', 'webgpu'].includes(epParam)) throw new Error(`?ep=${epParam}: expected auto, wasm or webgpu`);
  const tryGpu = epParam === 'webgpu' || (epParam === 'auto' && (await webgpuUsable()));
  if (epParam === 'webgpu' && !tryGpu) throw new Error('?ep=webgpu, but this browser has no usable WebGPU adapter');
  // ort.min.mjs carries the WebGPU and wasm EPs; ort.wasm.min.mjs (smaller) only wasm.
  const ort = await import(ORT_BASE + (tryGpu ? 'ort.min.mjs' : 'ort.wasm.min.mjs'));
  const isolated = globalThis.crossOriginIsolated === true;
  // Half the cores (at most 4) leave room for the page and the rest of the machine.
  const maxThreads = isolated ? Math.max(1, Math.min(4, Math.floor((navigator.hardwareConcurrency || 1) / 2))) : 1;
  const threads = intParam('threads', maxThreads, 1, 64);
  if (threads > 1 && !isolated) throw new Error(`?threads=${threads} needs a cross-origin isolated page (COOP/COEP headers; serve.mjs sends them)`);
  ort.env.wasm.numThreads = threads;
  ort.env.wasm.wasmPaths = ORT_BASE;
  ort.env.logLevel = 'warning';
  const options = { graphOptimizationLevel: 'all', executionMode: 'sequential' };
  if (tryGpu) {
    try {
      const session = await ort.InferenceSession.create(modelBytes, { ...options, executionProviders: ['webgpu', 'wasm'] });
      return { ort, session, ep: 'webgpu', threads, options: { ...options, executionProviders: ['webgpu', 'wasm'] } };
    } catch (e) {
      if (epParam === 'webgpu') throw e;
      console.warn(`WebGPU session failed, falling back to wasm: ${e.message}`);
    }
  }
  const wasmOptions = { ...options, executionProviders: ['wasm'] };
  const session = await ort.InferenceSession.create(modelBytes, wasmOptions);
  return { ort, session, ep: 'wasm', threads, options: wasmOptions };
}

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

// ------------------------------------------------------------------ main
async function main() {
  const base = (params.get('artifacts') || '/artifacts/tiny').replace(/\/+$/, '');
  ui.status(`loading ${base}/manifest.json …`);
  const manifest = readManifest(await (await fetchOk(`${base}/manifest.json`)).json(), `${base}/manifest.json`);
  const { config, params: plist, files } = manifest;
  const V = config.vocab, C = config.context;

  // Training data: exact batches from a file, or windows of a text.
  let nextBatch, totalSteps, hpBase, B, T, dataNote, clip;
  const batchesUrl = params.get('batches');
  if (batchesUrl) {
    ui.status(`loading batches ${batchesUrl} …`);
    const res = await fetchOk(batchesUrl);
    const isJson = /\.json($|\?)/.test(batchesUrl) || (res.headers.get('content-type') || '').includes('json');
    const src = isJson ? await res.json() : await res.arrayBuffer();
    const batches = readBatches(src, config, batchesUrl);
    ({ batch: B, seq: T } = batches);
    hpBase = batches.hp;
    clip = checkClip(numParam('clip', 0, (v) => v >= 0, 'a number >= 0'));
    totalSteps = batches.n;
    nextBatch = (i) => batchAt(batches, i);
    dataNote = `${batches.n} batches from ${batchesUrl}`;
  } else {
    const corpusUrl = params.get('corpus') || './corpus.txt';
    const text = new Uint8Array(await (await fetchOk(corpusUrl)).arrayBuffer());
    B = intParam('batch', 4, 1, 1024);
    T = intParam('seq', C, 1, C);
    const seed = intParam('seed', 0, 0, 2 ** 32 - 1);
    const steps = intParam('steps', 0, 0, 1e9); // 0: until Stop
    totalSteps = steps > 0 ? steps : Infinity;
    hpBase = checkHp({
      lr: numParam('lr', 1e-3, (v) => v >= 0, 'a number >= 0'),
      beta1: config.beta1 ?? 0.9, beta2: config.beta2 ?? 0.999, eps: config.eps ?? 1e-8,
      weight_decay: config.weight_decay ?? 0.01,
    }, 'hyperparameters');
    clip = checkClip(numParam('clip', 1, (v) => v >= 0, 'a number >= 0'));
    const draw = byteSampler(text, B, T, seed);
    nextBatch = () => draw();
    dataNote = `random ${B}x${T} windows of ${corpusUrl} (${text.length} bytes, seed ${seed})`;
  }

  ui.status('loading weights and train_step.onnx …');
  const [weightBytes, stepBytes] = await Promise.all([
    verified(base, 'weights.safetensors', files),
    verified(base, 'train_step.onnx', files),
  ]);
  const weights = weightsFor(plist, parseSafetensors(weightBytes, 'weights.safetensors'));
  let state = {
    p: weights,
    m: plist.map((p, i) => new Float32Array(weights[i].length)),
    v: plist.map((p, i) => new Float32Array(weights[i].length)),
  };

  ui.status('starting onnxruntime-web …');
  const rt = await startOrt(stepBytes, params.get('ep') || 'auto');
  const { ort, session } = rt;
  const expected = trainStepInputs(plist);
  if (session.inputNames.join('\n') !== expected.join('\n')) {
    throw new Error(`train_step.onnx inputs [${session.inputNames.slice(0, 4).join(', ')}, …] (${session.inputNames.length}) differ from the manifest's order (${expected.length})`);
  }
  const nParams = weights.reduce((a, w) => a + w.length, 0);
  $('backend').textContent = `${rt.ep}${rt.ep === 'wasm' ? ` ×${rt.threads}` : ''}`;
  $('info').textContent =
    `${base}: d_model ${config.d_model}, ${config.n_layers} layers, context ${C}, vocab ${V}, ` +
    `${(nParams / 1e6).toFixed(2)}M parameters, ${config.labels} labels · data: ${dataNote} · ` +
    `lr ${hpBase.lr}, betas (${hpBase.beta1}, ${hpBase.beta2}), eps ${hpBase.eps}, wd ${hpBase.weight_decay}, ` +
    `clip ${clip > 0 && clip < Infinity ? clip : 'off'} · ` +
    `onnxruntime-web ${ort.env.versions ? ort.env.versions.web || ort.env.versions.common : ''}, ` +
    `cross-origin isolated: ${globalThis.crossOriginIsolated === true}`;

  const tensorsOf = (arrays) => arrays.map((a, i) => new ort.Tensor('float32', a, plist[i].shape));
  const dims = [B, T];

  let step = 0; // updates applied
  let gradNorm = null; // global gradient norm of the last step, before clipping
  let running = false;
  let trainMs = 0;

  async function trainStep() {
    const { tokens, positions, labels } = nextBatch(step);
    const feeds = {};
    const pt = tensorsOf(state.p), mt = tensorsOf(state.m), vt = tensorsOf(state.v);
    plist.forEach(({ name }, i) => {
      feeds[name] = pt[i];
      feeds[`m.${name}`] = mt[i];
      feeds[`v.${name}`] = vt[i];
    });
    feeds.tokens = new ort.Tensor('int64', tokens, dims);
    feeds.positions = new ort.Tensor('int64', positions, dims);
    feeds.labels = config.labels === 'dense'
      ? new ort.Tensor('float32', denseLabels(labels, V), [B, T, V])
      : new ort.Tensor('int64', labels, dims);
    feeds.hp = new ort.Tensor('float32', makeHp(hpBase, step + 1), [7]);
    feeds.clip = new ort.Tensor('float32', Float32Array.of(clip), []);
    const out = await session.run(feeds);
    const loss = Number(out.loss.data[0]);
    gradNorm = Number(out.grad_norm.data[0]);
    if (!Number.isFinite(loss)) {
      throw new Error(`loss is ${loss} at step ${step + 1}; the update was not applied (state stays at step ${step})`);
    }
    const take = (prefix) => plist.map(({ name }) => out[`${prefix}${name}`].data);
    state = { p: take('new.'), m: take('new.m.'), v: take('new.v.') };
    step += 1;
    return loss;
  }

  // Between steps, give the browser a task boundary so clicks (Stop), painting and other tasks
  // get in: awaiting session.run alone only yields microtasks.
  const yieldToBrowser = () => new Promise((resolve) => setTimeout(resolve, 0));

  let forwardSession = null;
  async function generate() {
    const prompt = params.get('prompt') ?? 'The ';
    const n = intParam('gen', 200, 0, 10000);
    const temperature = numParam('temperature', 0, (v) => v >= 0, 'a number >= 0');
    const rand = mulberry32(intParam('sample_seed', 0, 0, 2 ** 32 - 1));
    if (!forwardSession) {
      const fwdBytes = await verified(base, 'forward.onnx', files);
      forwardSession = await ort.InferenceSession.create(fwdBytes, rt.options);
    }
    const seq = Array.from(new TextEncoder().encode(prompt));
    if (seq.length === 0) seq.push(10); // start from a newline when the prompt is empty
    const promptLength = seq.length;
    const weightsT = tensorsOf(state.p);
    for (let i = 0; i < n; i++) {
      const ctx = seq.slice(-C);
      const feeds = {};
      plist.forEach(({ name }, k) => { feeds[name] = weightsT[k]; });
      feeds.tokens = new ort.Tensor('int64', BigInt64Array.from(ctx, BigInt), [1, ctx.length]);
      feeds.positions = new ort.Tensor('int64', BigInt64Array.from(ctx, (_, j) => BigInt(j)), [1, ctx.length]);
      const { logits } = await forwardSession.run(feeds);
      if (i % 16 === 15) await yieldToBrowser();
      const start = (ctx.length - 1) * V;
      seq.push(temperature === 0
        ? argmax(logits.data, start, start + V)
        : sampleLogits(logits.data, start, start + V, temperature, rand()));
    }
    const decoder = new TextDecoder('utf-8');
    const text = decoder.decode(new Uint8Array(seq));
    const sampleEl = $('sample');
    sampleEl.textContent = '';
    const head = document.createElement('span');
    head.className = 'prompt';
    head.textContent = decoder.decode(new Uint8Array(seq.slice(0, promptLength)));
    sampleEl.append(head, decoder.decode(new Uint8Array(seq.slice(promptLength))));
    $('sample-info').textContent = `${n} bytes after step ${step}, ${temperature === 0 ? 'greedy' : `temperature ${temperature}`}, forward.onnx`;
    window.sample = { tokens: seq, promptLength, text, step, temperature };
  }

  function showStats(loss) {
    $('step').textContent = String(step);
    $('loss').textContent = loss.toFixed(4);
    if (trainMs > 0) $('tps').textContent = Math.round((step * B * T) / (trainMs / 1000)).toLocaleString('en-US');
    scheduleChart();
  }

  async function run() {
    running = true;
    window.trainDone = false;
    ui.button.textContent = 'Stop';
    ui.button.classList.add('stop');
    ui.status(`training: ${dataNote}`);
    try {
      while (running && step < totalSteps) {
        const t0 = performance.now();
        const loss = await trainStep();
        trainMs += performance.now() - t0;
        window.trainLog.push({ step, loss, grad_norm: gradNorm });
        showStats(loss);
        await yieldToBrowser();
      }
      running = false;
      ui.button.disabled = true;
      ui.button.classList.remove('stop');
      ui.status(`stopped after step ${step}; generating a sample …`);
      await generate();
      const left = totalSteps - step;
      ui.button.textContent = left > 0 ? 'Start' : 'Done';
      ui.button.disabled = !(left > 0);
      ui.status(`stopped after step ${step}${left > 0 ? '; Start continues' : ` (all ${totalSteps} steps done)`}`);
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
  drawChart(window.trainLog);
  window.addEventListener('resize', scheduleChart);
  ui.status(`ready: ${dataNote}${Number.isFinite(totalSteps) ? `, ${totalSteps} steps` : ''}. Press Start.`);
}

main().catch(fail);
