#!/usr/bin/env node
// Train gpt2-onnx-train artifacts from Node.js.
//
//   node hosts/node/train.mjs --artifacts DIR --steps N [--lr 1e-3] [--batch B] [--seq T]
//        [--seed S] [--data FILE | --batches FILE] [--out FILE]
//        [--clip C] [--training-set] [--threads K]
//
// Prints `step N loss X` (and `grad_norm G` on train_step.onnx) per step and, with --out, saves the trained weights as safetensors
// (the layout of weights.safetensors), atomically and never inside the artifact folder.
// Without --out nothing is written. Bad input: one `error: ...` line on stderr, exit status 2.

import { existsSync, readFileSync, statSync } from 'node:fs';

import {
  DataError,
  GPT2Error,
  InputError,
  ORT_DEFAULT_LR,
  PortableTrainer,
  TrainingSetTrainer,
  byteSampler,
  checkOutputPath,
  denseLabels,
  loadArtifacts,
  loadTokenizer,
  makeHp,
  randomSampler,
  readBatchFile,
  tokenSampler,
} from './gpt2train.mjs';
import { decodeText } from '../common/tokenizer.mjs';

const USAGE = `usage: node train.mjs --artifacts DIR [--steps N] [--lr LR] [--batch B] [--seq T] [--seed S]
       [--data FILE | --batches FILE] [--out FILE] [--clip C] [--training-set] [--threads K]
  --artifacts DIR   artifact folder (python -m graphgen build --out DIR)
  --steps N         updates to run (required unless --batches, whose batch count is the default)
  --lr LR           constant learning rate (default 1e-3; a batch file carries its own)
  --batch B         sequences per step (default 4)
  --seq T           tokens per sequence (default: the artifacts' context)
  --seed S          sampler seed (default 1)
  --data FILE       train on this file's text: its bytes, or, where the folder has a Hugging Face
                    tokenizer (manifest tokenizer kind "huggingface"), its tokenizer.json ids
  --batches FILE    train on batches written by python -m runtimes.batchfile
                    (neither: seeded random tokens)
  --out FILE        save the trained weights here, safetensors (default: not saved);
                    replaced atomically, and never inside the artifact folder
  --clip C          clip the global gradient norm to C before AdamW (default 0: off;
                    --training-set: the threshold its optimizer model was built with)
  --training-set    run the ORT training set through onnxruntime-web 1.19.2
                    instead of train_step.onnx through onnxruntime-node
  --threads K       intra-op threads for onnxruntime-node`;

const FLAGS = {
  '--artifacts': 'string', '--steps': 'int', '--lr': 'float', '--batch': 'int', '--seq': 'int', '--seed': 'int',
  '--data': 'string', '--batches': 'string', '--out': 'string', '--clip': 'float', '--threads': 'int', '--training-set': 'bool', '--help': 'bool',
};

function parseArgs(argv) {
  const opts = {};
  for (let i = 0; i < argv.length; i++) {
    let flag = argv[i];
    let value;
    if (flag.includes('=')) [flag, value] = [flag.slice(0, flag.indexOf('=')), flag.slice(flag.indexOf('=') + 1)];
    const kind = FLAGS[flag];
    if (!kind) throw new InputError(`unknown argument ${JSON.stringify(argv[i])} (flags: ${Object.keys(FLAGS).join(' ')})`);
    const key = flag.slice(2).replace(/-./g, (s) => s[1].toUpperCase());
    if (key in opts) throw new InputError(`${flag} given twice`);
    if (kind === 'bool') {
      if (value !== undefined) throw new InputError(`${flag} takes no value`);
      opts[key] = true;
      continue;
    }
    if (value === undefined) {
      if (i + 1 >= argv.length) throw new InputError(`${flag} needs a value`);
      value = argv[++i];
    }
    if (kind === 'int') {
      if (!/^-?\d+$/.test(value)) throw new InputError(`${flag} must be an integer, got ${JSON.stringify(value)}`);
      opts[key] = Number(value);
    } else if (kind === 'float') {
      const x = Number(value);
      if (value.trim() === '' || !Number.isFinite(x)) throw new InputError(`${flag} must be a finite number, got ${JSON.stringify(value)}`);
      opts[key] = x;
    } else {
      if (value === '') throw new InputError(`${flag} must not be empty`);
      opts[key] = value;
    }
  }
  return opts;
}

function atLeast(flag, value, lo) {
  if (value !== undefined && !(value >= lo)) throw new InputError(`${flag} must be >= ${lo}, got ${value}`);
}

async function main(argv) {
  const o = parseArgs(argv);
  if (o.help) {
    console.log(USAGE);
    return 0;
  }
  if (!o.artifacts) throw new InputError("--artifacts DIR is required (node train.mjs --help)");
  if (o.data && o.batches) throw new InputError('--data and --batches exclude each other: give one source of batches');
  atLeast('--steps', o.steps, 1);
  atLeast('--batch', o.batch, 1);
  atLeast('--seq', o.seq, 1);
  atLeast('--seed', o.seed, 0);
  atLeast('--threads', o.threads, 1);
  atLeast('--lr', o.lr, 0);
  atLeast('--clip', o.clip, 0);
  if (o.seed !== undefined && o.seed > 0xffffffff) throw new InputError(`--seed must be in [0, 4294967295], got ${o.seed}`);
  if (o.batches && (o.lr !== undefined || o.batch !== undefined || o.seq !== undefined || o.seed !== undefined)) {
    throw new InputError('--lr, --batch, --seq and --seed come from the batch file with --batches; drop them');
  }
  if (o.trainingSet && o.threads !== undefined) throw new InputError('--threads applies to onnxruntime-node; the --training-set (onnxruntime-web) path runs one thread');
  if (!o.batches && o.steps === undefined) throw new InputError('--steps N is required (unless --batches, which runs every batch in the file)');

  // cheap checks first; the trainer verifies the files it opens. Frozen inputs (a LoRA folder)
  // are for the train_step.onnx trainer only: the training-set path refuses them here.
  const art = loadArtifacts(o.artifacts, [], { frozen: !o.trainingSet });
  // No default output file: a default name in the working folder would replace whatever has it.
  const out = o.out === undefined ? undefined : checkOutputPath(o.out, o.artifacts);
  const cfg = art.config;

  // Batches and hp first: a bad batch file fails before any session is created.
  let next;
  let steps = o.steps;
  let hpBase;
  if (o.batches) {
    const bf = readBatchFile(o.batches, cfg);
    if (steps !== undefined && steps > bf.n) throw new InputError(`--steps ${steps} > the ${bf.n} batches in ${o.batches}: --steps must be in [1, ${bf.n}]`);
    steps ??= bf.n;
    let i = 0;
    next = () => bf.get(i++);
    hpBase = { lr: bf.hp.lr ?? ORT_DEFAULT_LR };
    for (const k of ['beta1', 'beta2', 'eps', 'weight_decay']) hpBase[k] = bf.hp[k] ?? cfg[k];
  } else {
    const batch = o.batch ?? 4;
    const seq = o.seq ?? cfg.context;
    if (seq > cfg.context) throw new InputError(`--seq ${seq} exceeds the artifacts' context ${cfg.context}: --seq must be in [1, ${cfg.context}]`);
    const seed = o.seed ?? 1;
    if (o.data) {
      if (!existsSync(o.data) || !statSync(o.data).isFile()) throw new DataError(`--data ${o.data}: no such file`);
      const bytes = readFileSync(o.data);
      const tok = loadTokenizer(art);
      if (tok.kind === 'bytes') {
        if (cfg.vocab < 256) throw new DataError(`--data trains on byte tokens (0..255), but the artifacts' vocab is ${cfg.vocab}`);
        next = byteSampler(bytes, batch, seq, seed);
      } else {
        const ids = tok.encode(decodeText(bytes));
        console.log(`data ${o.data}: ${bytes.length} bytes, ${ids.length} tokens (${tok.kind} tokenizer.json)`);
        next = tokenSampler(ids, batch, seq, seed);
      }
    } else {
      next = randomSampler(cfg.vocab, batch, seq, seed);
    }
    hpBase = { lr: o.lr ?? ORT_DEFAULT_LR, beta1: cfg.beta1, beta2: cfg.beta2, eps: cfg.eps, weight_decay: cfg.weight_decay };
  }

  const trainer = o.trainingSet ? await TrainingSetTrainer.create(o.artifacts) : await PortableTrainer.create(o.artifacts, { threads: o.threads });
  if (o.trainingSet) trainer.checkHpSupported(makeHp(hpBase.lr, hpBase.beta1, hpBase.beta2, hpBase.eps, hpBase.weight_decay, 1));
  for (let s = 1; s <= steps; s++) {
    const b = next();
    const labels = cfg.labels === 'dense' ? denseLabels(b.labels, cfg.vocab) : b.labels;
    const hp = makeHp(hpBase.lr, hpBase.beta1, hpBase.beta2, hpBase.eps, hpBase.weight_decay, s);
    const loss = await trainer.step(b.tokens, b.positions, labels, hp, ...(o.clip === undefined ? [] : [o.clip]));
    console.log(`step ${s} loss ${loss}` + (trainer.lastGradNorm === undefined ? '' : ` grad_norm ${trainer.lastGradNorm}`));
  }
  if (out !== undefined) {
    await trainer.save(out);
    console.log(`saved ${art.params.length} tensors after ${steps} steps to ${out}`);
  } else {
    console.log(`trained ${steps} steps; weights not saved (give --out FILE to keep them)`);
  }
  await trainer.release();
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e) => {
    const msg = String(e?.message ?? e).replace(/\s*\n\s*/g, ' ');
    process.stderr.write(`error: ${msg}\n`);
    if (process.env.GPT2_NODE_DEBUG && e?.stack) process.stderr.write(`${e.stack}\n`);
    process.exit(e instanceof GPT2Error ? 2 : 1);
  },
);
