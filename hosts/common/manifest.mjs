// manifest.json and weights.safetensors against it: the one manifest checker of the
// JavaScript hosts. It refuses what contract/manifest.py refuses, held to the same cases
// (contract/vectors/manifests.json).
//
// Like every shared check, it throws `new Err(message)`: Err defaults to Error (what the page
// reports); hosts/node passes its own error classes.

import {
  CONFIG_KEYS, CONFIG_SIZES, FROZEN_MANIFEST_VERSION, HP_LAYOUT, LABEL_MODES, MANIFEST_FORMAT, MANIFEST_VERSIONS, RETIRED_VERSIONS,
} from './contract.mjs';
import { parseSafetensors } from './safetensors.mjs';
import { isObject, kindOf, numel, own, sameShape, show } from './util.mjs';

/**
 * Whether a manifest file name could leave the artifact folder: absolute (POSIX, Windows
 * drive or UNC), or with a ".." segment (either separator, as a browser URL would read it).
 */
function escapesFolder(name) {
  return name === '' || /^[/\\]/.test(name) || /^[A-Za-z]:/.test(name) || name.includes('\0') || name.split(/[/\\]/).includes('..');
}

// The AdamW constants the hosts build hp from, and the training set's clipping threshold
// (optional in a config: a caller may give its own).
const OPTIONAL_NUMBERS = [
  ['beta1', (v) => v >= 0 && v < 1, 'in [0, 1)'],
  ['beta2', (v) => v >= 0 && v < 1, 'in [0, 1)'],
  ['eps', (v) => v > 0, '> 0'],
  ['weight_decay', (v) => v >= 0, '>= 0'],
  ['clip', (v) => v >= 0, '>= 0'],
];

/**
 * Check a parsed manifest.json: format, version, the type of every key the hosts read, and
 * internal consistency (parameter shapes vs config, file entries). Throws `new Err(message)`
 * naming `where` and the bad value; returns the manifest.
 */
export function checkManifest(manifest, where = 'manifest.json', Err = Error, { frozen: trainsFrozen = false } = {}) {
  if (!isObject(manifest)) throw new Err(`${where}: not a ${MANIFEST_FORMAT} manifest (its JSON is a ${kindOf(manifest)}, not an object)`);
  if (manifest.format !== MANIFEST_FORMAT) throw new Err(`${where}: not a ${MANIFEST_FORMAT} manifest (format=${show(manifest.format)})`);
  const version = manifest.format_version;
  if (RETIRED_VERSIONS.has(version)) {
    throw new Err(`${where}: format_version ${version} is retired: ${RETIRED_VERSIONS.get(version)}; rebuild the artifacts (python -m graphgen build, or make artifacts)`);
  }
  const isFrozen = version === FROZEN_MANIFEST_VERSION || own(manifest, 'frozen');
  if (isFrozen && !trainsFrozen) {
    // A trainer that ran it would update the base weights or miss their inputs: it is refused whole.
    throw new Err(`${where}: format_version ${show(version)} is a LoRA folder (frozen base weights); this trainer does not train frozen inputs: use python -m runtimes train --runtime ort`);
  }
  if (isFrozen && (version !== FROZEN_MANIFEST_VERSION || !own(manifest, 'frozen'))) {
    throw new Err(`${where}: format_version ${show(version)} ${own(manifest, 'frozen') ? 'with' : 'without'} frozen inputs: a LoRA folder is format_version ${FROZEN_MANIFEST_VERSION} with a "frozen" entry; rebuild the artifacts`);
  }
  if (!isFrozen && !MANIFEST_VERSIONS.includes(version)) {
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
  if (!LABEL_MODES.includes(cfg.labels)) bad(`config.labels = ${show(cfg.labels)}, expected ${LABEL_MODES.map(show).join(' or ')}`);
  for (const [k, ok, range] of OPTIONAL_NUMBERS) {
    if (own(cfg, k) && !(typeof cfg[k] === 'number' && Number.isFinite(cfg[k]) && ok(cfg[k]))) bad(`config.${k} = ${show(cfg[k])}, expected a number ${range}`);
  }
  const hp = manifest.hp;
  if (!Array.isArray(hp.layout) || !sameShape(hp.layout, HP_LAYOUT) || hp.length !== HP_LAYOUT.length || hp.dtype !== 'float32') {
    bad(`hp is ${show(hp.dtype)}[${show(hp.length)}] ${show(hp.layout)}, this host feeds float32[${HP_LAYOUT.length}] ${show(HP_LAYOUT)}`);
  }
  const names = new Set();
  const checkParams = (list, key) => list.forEach((p, i) => {
    if (!isObject(p) || typeof p.name !== 'string' || p.name === '' || !Array.isArray(p.shape)
        || !p.shape.every((d) => Number.isInteger(d) && d >= 1) || p.dtype !== 'float32') {
      bad(`${key}[${i}] = ${show(p)} is not {name, shape: [positive integers], dtype: "float32"}`);
    }
    if (names.has(p.name)) bad(`parameter ${show(p.name)} is listed twice`);
    names.add(p.name);
  });
  checkParams(manifest.parameters, 'parameters');
  if (names.size === 0) bad('lists no parameters');
  let frozenParams = [];
  if (isFrozen) {
    // the base weights: read every step, never updated, in their own verified file
    const fz = manifest.frozen;
    if (!isObject(fz) || fz.file !== 'base.safetensors' || typeof fz.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(fz.sha256)
        || !Array.isArray(fz.parameters) || fz.parameters.length === 0) {
      bad(`frozen = ${show(fz)} is not {file: "base.safetensors", sha256, parameters: [...]}`);
    }
    if (!isObject(manifest.files[fz.file]) || manifest.files[fz.file].sha256 !== fz.sha256) {
      bad(`frozen.sha256 is not files[${show(fz.file)}]'s`);
    }
    checkParams(fz.parameters, 'frozen.parameters');
    frozenParams = fz.parameters;
  }
  const shapes = new Map([...manifest.parameters, ...frozenParams].map((p) => [p.name, p.shape]));
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

/**
 * The manifest's parameters from parsed safetensors tensors ({name: {dtype, shape, data}}):
 * every one present, F32, of the manifest's shape. Returns {name: Float32Array} in manifest
 * order; throws `new Err(message)` naming `what` (the weights file).
 */
export function weightsFor(params, tensors, what = 'weights.safetensors', Err = Error) {
  const missing = params.filter((p) => !own(tensors, p.name)).map((p) => p.name);
  if (missing.length) throw new Err(`${what}: missing parameters ${missing.slice(0, 5).join(', ')}${missing.length > 5 ? '...' : ''}`);
  const out = {};
  for (const p of params) {
    const t = tensors[p.name];
    if (t.dtype !== 'F32' || !sameShape(t.shape, p.shape)) {
      throw new Err(`${what}: parameter ${p.name} is ${t.dtype}${JSON.stringify(t.shape)}, manifest says F32${JSON.stringify(p.shape)}`);
    }
    out[p.name] = t.data;
  }
  return out;
}

/** A checked manifest's frozen inputs (a LoRA folder's base weights: fed at every step, never
 *  updated), [{name, shape, dtype}]; [] for a folder that trains every weight. */
export function frozenParameters(manifest) {
  return manifest.frozen?.parameters ?? [];
}

/** [trained, total] numbers of weights of a checked manifest: a LoRA folder trains its adapters
 *  (parameters) and not its base (frozen.parameters), as runtimes' Artifacts.param_counts. */
export function parameterCounts(manifest) {
  const count = (list) => list.reduce((n, p) => n + numel(p.shape), 0);
  const trained = count(manifest.parameters);
  return [trained, trained + count(frozenParameters(manifest))];
}

/**
 * A LoRA folder's base weights as session feeds: `bytes` of its base.safetensors (whose size and
 * sha256 the caller has checked against the manifest) parsed, every frozen parameter present, F32
 * and of its manifest shape (weightsFor), each wrapped once as a float32 `Tensor` (the host's
 * onnxruntime Tensor class), so the same tensors are fed at every step and none is ever replaced.
 * Returns {name: Tensor}; {} for a manifest without frozen inputs. `what` names the file in messages.
 */
export function frozenFeeds(Tensor, manifest, bytes, what = 'base.safetensors', Err = Error) {
  const frozen = frozenParameters(manifest);
  if (frozen.length === 0) return {};
  const base = weightsFor(frozen, parseSafetensors(bytes, what, Err).tensors, what, Err);
  return Object.fromEntries(frozen.map(({ name, shape }) => [name, new Tensor('float32', base[name], shape)]));
}
