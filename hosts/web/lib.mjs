// The page's own helpers, without DOM or onnxruntime: the manifest as the page reads it, the
// checks on each file it fetches, sampling from logits and SHA-256 with WebCrypto. The contract
// (constants, manifest checker, safetensors, batch files, hp, samplers, the ONNX external-data
// check) is hosts/common's, shared with hosts/node.
//
// Plain ES module for browsers and Node: serve.mjs serves it at /hosts/web/lib.mjs, next to
// /hosts/common/, so its relative imports resolve in the page as they do on disk (and
// tests/test_host_reliability.py runs the page's checks from here under Node).

import { checkManifest, frozenParameters, parameterCounts } from '../common/manifest.mjs';
import { checkSelfContained } from '../common/onnx_scan.mjs';
import { tokenizerEntry } from '../common/tokenizer.mjs';

export { checkSelfContained };

/** Check manifest.json (hosts/common checkManifest, and its tokenizer entry: a kind the page cannot
 *  tokenize is refused) and return what the page needs from it. The page feeds frozen inputs (a
 *  LoRA folder's base weights, `frozen`: [{name, shape, dtype}], [] elsewhere) at every step, so a
 *  LoRA folder is read; `counts` is [trained, total] numbers of weights, `json` the manifest itself. */
export function readManifest(manifest, where = 'manifest.json') {
  checkManifest(manifest, where, Error, { frozen: true });
  const tokenizer = tokenizerEntry(manifest, where);
  return {
    json: manifest,
    config: manifest.config,
    params: manifest.parameters,
    frozen: frozenParameters(manifest),
    frozenFile: manifest.frozen?.file ?? null,
    counts: parameterCounts(manifest),
    files: manifest.files,
    tokenizer,
  };
}

/**
 * Check a fetched file of the artifact folder against its manifest entry ({sha256, bytes}):
 * its size, its SHA-256 (`digest`; null where the page cannot hash, which only warns) and, for
 * an ONNX model, that it holds all its data (checkSelfContained). `url` names it in messages.
 */
export function checkFile(name, bytes, entry, digest, url) {
  if (entry.bytes !== bytes.byteLength) {
    throw new Error(`${name}: ${bytes.byteLength} bytes, the manifest says ${entry.bytes}`);
  }
  if (digest === null) console.warn(`${name}: not a secure context (no WebCrypto); sha256 not checked`);
  if (digest !== null && digest !== entry.sha256) throw new Error(`${name}: sha256 ${digest} does not match the manifest's ${entry.sha256}`);
  if (name.endsWith('.onnx')) checkSelfContained(bytes, url);
  return bytes;
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

/**
 * Which execution provider runs which node, from onnxruntime's verbose session log (the
 * "Node placements" lines it prints at session creation; there is no API for it):
 * {provider: {opType: count}}. Lines that are not placements are ignored.
 */
export function parsePlacements(lines) {
  const placed = {};
  let current = null;
  for (const raw of lines) {
    const line = String(raw);
    const head = /placed on \[(\w+)\]\. Number of nodes: (\d+)/.exec(line);
    if (head) {
      current = placed[head[1]] = {};
      continue;
    }
    const node = current && /VerifyEachNodeIsAssignedToAnEp\]\s+(\w+) \(.*\)\s*$/.exec(line);
    if (node) current[node[1]] = (current[node[1]] || 0) + 1;
    else if (!/VerifyEachNodeIsAssignedToAnEp/.test(line)) current = null;
  }
  return placed;
}
