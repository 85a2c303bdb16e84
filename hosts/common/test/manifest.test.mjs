import assert from 'node:assert/strict';
import { test } from 'node:test';

import { CONSTANTS, MANIFEST_FORMAT, RETIRED_VERSIONS, newMName, trainStepInputs, trainStepOutputs } from '../contract.mjs';
import { checkManifest, frozenFeeds, frozenParameters, parameterCounts, weightsFor } from '../manifest.mjs';
import { encodeSafetensors } from '../safetensors.mjs';
import { numel } from '../util.mjs';
import base from '../../../contract/vectors/manifest_base.json' with { type: 'json' };
import manifests from '../../../contract/vectors/manifests.json' with { type: 'json' };

/** manifest_base.json with one edit [op, path, value?] applied (op: set or delete). */
function edited(edit) {
  const m = structuredClone(base);
  if (edit === null) return m;
  const [op, path, value] = edit;
  const target = path.slice(0, -1).reduce((node, key) => node[key], m);
  if (op === 'delete') delete target[path.at(-1)];
  else if (op === 'set') target[path.at(-1)] = value;
  else throw new Error(`unknown edit op ${op}`);
  return m;
}

class ManifestError extends Error {}

for (const c of manifests.cases) {
  test(`manifest vector: ${c.name}`, () => {
    const m = edited(c.edit);
    if (c.error === null) {
      assert.equal(checkManifest(m, 'manifest.json', ManifestError), m);
    } else {
      assert.throws(() => checkManifest(m, 'manifest.json', ManifestError), (e) => {
        assert.ok(e instanceof ManifestError, e);
        assert.ok(e.message.startsWith('manifest.json: '), e.message);
        assert.ok(e.message.includes(c.error), `${JSON.stringify(c.error)} not in ${JSON.stringify(e.message)}`);
        return true;
      });
    }
  });
}

test('the constants come from contract/constants.json', () => {
  assert.equal(MANIFEST_FORMAT, CONSTANTS.format);
  assert.equal(base.format, MANIFEST_FORMAT);
  assert.ok(RETIRED_VERSIONS.size > 0 && [...RETIRED_VERSIONS.keys()].every(Number.isInteger));
  assert.ok(Object.isFrozen(CONSTANTS.hp.layout));
});

test("train_step names are the builder's (manifest_base.json's train_step.onnx inputs and outputs)", () => {
  const io = base.models['train_step.onnx'];
  assert.deepEqual(trainStepInputs(base.parameters), io.inputs.map((x) => x.name));
  assert.deepEqual(trainStepOutputs(base.parameters), io.outputs.map((x) => x.name));
  assert.equal(newMName('a$&b'), CONSTANTS.names.new_m.split('{p}').join('a$&b')); // `$` in a name is literal
});

test('weightsFor: every parameter, F32, of the manifest shape', () => {
  const params = [{ name: 'a', shape: [2] }, { name: 'b', shape: [1, 1] }];
  const tensors = { a: { dtype: 'F32', shape: [2], data: Float32Array.of(1, 2) }, b: { dtype: 'F32', shape: [1, 1], data: Float32Array.of(3) } };
  assert.deepEqual(Object.keys(weightsFor(params, tensors)), ['a', 'b']);
  assert.throws(() => weightsFor(params, { a: tensors.a }, 'w.st'), /w\.st: missing parameters b/);
  assert.throws(() => weightsFor(params, { ...tensors, b: { ...tensors.b, shape: [1] } }, 'w.st'), /parameter b is F32\[1\], manifest says F32\[1,1\]/);
});

/** manifest_base.json turned into a LoRA folder's manifest: its weights frozen, one adapter trained. */
function loraManifest() {
  const m = structuredClone(base);
  const sha = 'a'.repeat(64);
  m.format_version = CONSTANTS.frozen_format_version;
  m.frozen = { file: 'base.safetensors', sha256: sha, parameters: m.parameters };
  m.files['base.safetensors'] = { sha256: sha, bytes: 1 };
  m.parameters = [{ name: 'h0.c_attn.lora_A', shape: [2, m.config.d_model], dtype: 'float32' }];
  return m;
}

test('a LoRA manifest: refused unless the trainer feeds frozen inputs, then its frozen entry is checked', () => {
  const m = loraManifest();
  assert.throws(() => checkManifest(m, 'manifest.json', ManifestError), /is a LoRA folder .*does not train frozen inputs/);
  assert.equal(checkManifest(m, 'manifest.json', ManifestError, { frozen: true }), m);
  const bad = (edit, message) => {
    const x = loraManifest();
    edit(x);
    assert.throws(() => checkManifest(x, 'manifest.json', ManifestError, { frozen: true }), message);
  };
  bad((x) => { x.format_version = 3; }, /format_version 3 with frozen inputs/);
  bad((x) => { x.frozen.file = '../base.safetensors'; }, /frozen = .* is not \{file: "base.safetensors"/);
  bad((x) => { x.frozen.sha256 = 'b'.repeat(64); }, /frozen.sha256 is not files\["base.safetensors"\]'s/);
  bad((x) => { x.frozen.parameters[0].dtype = 'float16'; }, /frozen.parameters\[0\] = .* is not \{name, shape/);
  bad((x) => { x.parameters[0].name = 'wte'; }, /parameter "wte" is listed twice/);
  bad((x) => { x.frozen.parameters[0].shape = [7, x.config.d_model]; }, /parameter wte has shape \[7,/);
  bad((x) => { delete x.frozen; }, /format_version 4 without frozen inputs/);
});

test("a LoRA manifest's frozen inputs: train_step's first inputs, counted apart, fed from base.safetensors", () => {
  const m = loraManifest();
  const [adapter] = m.parameters;
  const frozenNames = m.frozen.parameters.map((p) => p.name);
  assert.deepEqual(frozenParameters(m), m.frozen.parameters);
  assert.deepEqual(frozenParameters(base), []);
  assert.deepEqual(trainStepInputs(m.parameters, m.frozen.parameters), [...frozenNames, ...trainStepInputs(m.parameters)]);
  assert.deepEqual(trainStepInputs(base.parameters, []), trainStepInputs(base.parameters));

  const total = base.parameters.reduce((n, p) => n + numel(p.shape), 0);
  assert.deepEqual(parameterCounts(base), [total, total]);
  assert.deepEqual(parameterCounts(m), [numel(adapter.shape), numel(adapter.shape) + total]);

  class Tensor {
    constructor(type, data, dims) { Object.assign(this, { type, data, dims }); }
  }
  const values = (p, k) => Float32Array.from({ length: numel(p.shape) }, (_, i) => k + i / 8);
  const file = (params) => encodeSafetensors(Object.fromEntries(params.map((p, k) => [p.name, { data: values(p, k), shape: p.shape }])));
  const feeds = frozenFeeds(Tensor, m, file(m.frozen.parameters), 'base.st');
  assert.deepEqual(Object.keys(feeds), frozenNames);
  m.frozen.parameters.forEach((p, k) => {
    assert.ok(feeds[p.name] instanceof Tensor && feeds[p.name].type === 'float32');
    assert.deepEqual(feeds[p.name].dims, p.shape);
    assert.deepEqual(feeds[p.name].data, values(p, k));
  });
  assert.deepEqual(frozenFeeds(Tensor, base, null), {}); // a full folder has no base to feed
  assert.throws(() => frozenFeeds(Tensor, m, file(m.frozen.parameters.slice(1)), 'base.st', ManifestError),
    (e) => e instanceof ManifestError && e.message === `base.st: missing parameters ${frozenNames[0]}`);
  assert.throws(() => frozenFeeds(Tensor, m, file(m.parameters), 'base.st'), /base\.st: missing parameters/);
  assert.throws(() => frozenFeeds(Tensor, m, new Uint8Array(4), 'base.st'), /base\.st: 4 bytes is too short/);
});
