// The ONNX external-data check both hosts run on every model before a session opens it.
//
// A tensor in an ONNX model may keep its data in another file (TensorProto.data_location =
// EXTERNAL, external_data {location, offset, length}); ONNX Runtime then reads that path,
// relative to the model or absolute, wherever it points. The models of these artifacts are
// self-contained, so the hosts refuse any model with external data before a session opens it.
// No protobuf library: a bounded walk of the wire format, descending only into the messages
// that can hold a tensor and skipping every other field by its length.

import { show } from './util.mjs';

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

/**
 * The fields of one protobuf message in bytes[start, end), in order: {field, wire, at, value}
 * for a varint, {field, wire, at, body, next} for a length-delimited field (its bytes are
 * [body, next)); fixed-width fields are skipped. `where` names the message in errors.
 */
function* fields(bytes, start, end, where) {
  let pos = start;
  while (pos < end) {
    const at = pos;
    let key;
    [key, pos] = varint(bytes, pos, end);
    const field = Math.floor(key / 8);
    const wire = key % 8;
    if (field === 0) throw new ProtobufError(`field number 0 at byte ${at} in ${where}`);
    if (wire === 0) {
      let value;
      [value, pos] = varint(bytes, pos, end);
      yield { field, wire, at, value };
    } else if (wire === 1 || wire === 5) {
      pos += wire === 1 ? 8 : 4;
    } else if (wire === 2) {
      let len;
      [len, pos] = varint(bytes, pos, end);
      if (len > end - pos) throw new ProtobufError(`field ${field} at byte ${at} claims ${len} bytes, ${end - pos} remain in ${where}`);
      yield { field, wire, at, body: pos, next: pos + len };
      pos += len;
    } else {
      throw new ProtobufError(`wire type ${wire} (field ${field}) at byte ${at} in ${where}, which ONNX models do not use`);
    }
    if (pos > end) throw new ProtobufError(`field ${field} at byte ${at} runs past the end of ${where}`);
  }
}

/** Walk one message of `kind` in bytes[start, end); the first tensor with external data, or null. */
function scanMessage(bytes, start, end, kind, path, depth) {
  if (depth > ONNX_MAX_DEPTH) throw new ProtobufError(`messages nest deeper than ${ONNX_MAX_DEPTH} levels at byte ${start}`);
  const isTensor = kind === 'tensor';
  const nested = ONNX_TENSOR_FIELDS[kind];
  let name = '';
  let external = false;
  let location;
  for (const f of fields(bytes, start, end, `its ${kind} message`)) {
    if (f.wire === 0) {
      if (isTensor && f.field === TENSOR_DATA_LOCATION && f.value === DATA_LOCATION_EXTERNAL) external = true;
    } else if (isTensor) {
      if (f.field === TENSOR_NAME) name = utf8.decode(bytes.subarray(f.body, f.next));
      if (f.field === TENSOR_EXTERNAL_DATA) {
        external = true;
        const entry = stringEntry(bytes, f.body, f.next);
        if (entry.key === 'location') location = entry.value;
      }
    } else if (nested[f.field]) {
      const [fname, next] = nested[f.field];
      const found = scanMessage(bytes, f.body, f.next, next, `${path}.${fname}`, depth + 1);
      if (found) return found;
    }
  }
  return external ? { name, path, location } : null;
}

/** StringStringEntryProto {key = 1, value = 2} in bytes[start, end). */
function stringEntry(bytes, start, end) {
  const out = { key: undefined, value: undefined };
  for (const f of fields(bytes, start, end, 'an external_data entry')) {
    if (f.wire !== 2) continue;
    const text = utf8.decode(bytes.subarray(f.body, f.next));
    if (f.field === 1) out.key = text;
    if (f.field === 2) out.value = text;
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
