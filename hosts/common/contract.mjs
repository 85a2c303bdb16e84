// The artifact contract's constants and names, read from contract/constants.json (the one
// place they are written) for both JavaScript hosts: hosts/node imports this file from disk,
// the page from /hosts/common/ (serve.mjs mounts contract/ at /contract/, so the relative
// import below resolves the same way in both).

import constants from '../../contract/constants.json' with { type: 'json' };

function deepFreeze(x) {
  if (x !== null && typeof x === 'object') {
    for (const v of Object.values(x)) deepFreeze(v);
    Object.freeze(x);
  }
  return x;
}

/** contract/constants.json, frozen: the JSON module is shared by every importer. */
export const CONSTANTS = deepFreeze(constants);

export const MANIFEST_FORMAT = CONSTANTS.format;
/** The format versions these hosts read. */
export const MANIFEST_VERSIONS = Object.freeze([CONSTANTS.format_version]);
/** The version of a folder with frozen inputs (LoRA): trained only by a trainer that feeds them
 *  (checkManifest's {frozen: true}), refused by the others. */
export const FROZEN_MANIFEST_VERSION = CONSTANTS.frozen_format_version;
/** version -> why it is refused. */
export const RETIRED_VERSIONS = new Map(Object.entries(CONSTANTS.retired_versions).map(([k, why]) => [Number(k), why]));
export const CONFIG_KEYS = CONSTANTS.config_keys;
export const CONFIG_SIZES = CONSTANTS.config_sizes;
export const LABEL_MODES = CONSTANTS.label_modes;
export const HP_INPUT = CONSTANTS.hp.input;
export const HP_LAYOUT = CONSTANTS.hp.layout;
/** Relative tolerance on beta1h/beta2h when a caller's hp is checked against its step. */
export const HP_RTOL = CONSTANTS.hp.rtol;
export const CLIP_INPUT = CONSTANTS.clip.input;
export const GRAD_NORM_OUTPUT = CONSTANTS.clip.norm_output;
export const BATCH_INPUTS = CONSTANTS.batch_inputs;
export const LOSS_OUTPUT = CONSTANTS.loss_output;
export const LOGITS_OUTPUT = CONSTANTS.logits_output;
/** How far a dense label row's sum may be from 1. */
export const DENSE_SUM_TOL = CONSTANTS.dense_sum_tol;
/** The ONNX Runtime training set's files. */
export const TRAINING_SET_FILES = CONSTANTS.training_set;

// split/join rather than String.replace, whose replacement string gives `$` a meaning.
const fill = (template) => (p) => template.split('{p}').join(p);

/** train_step input holding AdamW's first moment of parameter p. */
export const mName = fill(CONSTANTS.names.m);
/** train_step input holding AdamW's second moment of parameter p. */
export const vName = fill(CONSTANTS.names.v);
/** train_step output holding parameter p after the update. */
export const newName = fill(CONSTANTS.names.new_param);
export const newMName = fill(CONSTANTS.names.new_m);
export const newVName = fill(CONSTANTS.names.new_v);

const namesOf = (params) => params.map((p) => (typeof p === 'string' ? p : p.name));

/** The train_step input names in order: a LoRA folder's frozen inputs (first, as the builder lays
 *  them out), params, their m and v moments, the batch, hp, clip. `params` and `frozen`: the
 *  manifest's parameters and frozen.parameters ({name, ...}) or their names; `frozen` is empty
 *  for a folder that trains every weight. */
export function trainStepInputs(params, frozen = []) {
  const names = namesOf(params);
  return [...namesOf(frozen), ...names, ...names.map(mName), ...names.map(vName), ...BATCH_INPUTS, HP_INPUT, CLIP_INPUT];
}

/** The train_step output names in order: loss, grad_norm, then the new params, m and v. */
export function trainStepOutputs(params) {
  const names = namesOf(params);
  return [LOSS_OUTPUT, GRAD_NORM_OUTPUT, ...names.map(newName), ...names.map(newMName), ...names.map(newVName)];
}
