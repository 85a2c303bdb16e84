// safetensors, read and written without Node's Buffer: 8-byte little-endian header length N,
// N bytes of JSON header, then the raw little-endian tensor data.
//
// Checks throw `new Err(message)`: Err defaults to Error; hosts/node passes its own classes.

import { numel } from './util.mjs';

export const DTYPES = Object.freeze({
  F32: { bytes: 4, array: Float32Array },
  F64: { bytes: 8, array: Float64Array },
  I64: { bytes: 8, array: BigInt64Array },
  I32: { bytes: 4, array: Int32Array },
  U8: { bytes: 1, array: Uint8Array },
});
const DTYPE_OF_ARRAY = new Map(Object.entries(DTYPES).map(([k, v]) => [v.array, k]));

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
const BIG_ENDIAN_MESSAGE = 'this platform is big-endian; safetensors data is little-endian';

/**
 * Parse a safetensors file's bytes (Uint8Array, Buffer or ArrayBuffer). Returns
 * {tensors: {name: {dtype, shape, data}}, metadata}; `data` is a fresh typed array of the
 * dtype (copied, so alignment never matters). `what` names the file in messages.
 */
export function parseSafetensors(buffer, what = 'safetensors file', Err = Error) {
  // A plain Uint8Array view, also of a Node Buffer (whose slice() shares memory instead of copying).
  const bytes = ArrayBuffer.isView(buffer) ? new Uint8Array(buffer.buffer, buffer.byteOffset, buffer.byteLength) : new Uint8Array(buffer);
  if (bytes.byteLength < 8) throw new Err(`${what}: ${bytes.byteLength} bytes is too short for a safetensors file`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const hlen = view.getBigUint64(0, true);
  if (hlen < 2n || hlen > BigInt(bytes.byteLength - 8)) {
    throw new Err(`${what}: header length ${hlen} does not fit in a ${bytes.byteLength}-byte file (not safetensors, or truncated)`);
  }
  const n = Number(hlen);
  let header;
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(8, 8 + n)));
  } catch (e) {
    throw new Err(`${what}: safetensors header is not valid UTF-8 JSON (${e.message})`);
  }
  if (header === null || typeof header !== 'object' || Array.isArray(header)) {
    throw new Err(`${what}: safetensors header is not a JSON object`);
  }
  if (!LITTLE_ENDIAN) throw new Err(BIG_ENDIAN_MESSAGE);
  const body = bytes.subarray(8 + n);
  const metadata = header.__metadata__ ?? {};
  if (metadata === null || typeof metadata !== 'object' || Array.isArray(metadata)) {
    throw new Err(`${what}: safetensors __metadata__ is not a JSON object`);
  }
  const tensors = {};
  for (const [name, info] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const dt = DTYPES[info?.dtype];
    if (!dt || !Object.prototype.hasOwnProperty.call(DTYPES, info.dtype)) {
      throw new Err(`${what}: tensor ${JSON.stringify(name)} has dtype ${JSON.stringify(info?.dtype)}; this reader supports ${Object.keys(DTYPES).join(', ')}`);
    }
    const shape = info.shape;
    if (!Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d >= 0)) {
      throw new Err(`${what}: tensor ${JSON.stringify(name)} has a malformed shape ${JSON.stringify(shape)}`);
    }
    const [begin, end] = Array.isArray(info.data_offsets) ? info.data_offsets : [];
    const want = numel(shape) * dt.bytes;
    if (!Number.isInteger(begin) || !Number.isInteger(end) || begin < 0 || end > body.length || end - begin !== want) {
      throw new Err(
        `${what}: tensor ${JSON.stringify(name)} data_offsets ${JSON.stringify(info.data_offsets)} do not hold ${want} bytes ` +
          `(${info.dtype}${JSON.stringify(shape)}) within the ${body.length}-byte data section (truncated?)`,
      );
    }
    const copy = new Uint8Array(want);
    copy.set(body.subarray(begin, end));
    tensors[name] = { dtype: info.dtype, shape, data: new dt.array(copy.buffer, 0, numel(shape)) };
  }
  return { tensors, metadata };
}

/**
 * Serialise tensors ({name: {data: TypedArray, shape}}) as safetensors bytes (Uint8Array).
 * Keys are sorted, data laid out in that order, the header padded with spaces to a multiple
 * of 8. metadata values must be strings (the format's rule).
 */
export function encodeSafetensors(tensors, metadata = undefined, Err = Error) {
  if (!LITTLE_ENDIAN) throw new Err(BIG_ENDIAN_MESSAGE);
  const names = Object.keys(tensors).sort();
  const header = {};
  if (metadata) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== 'string') throw new Err(`safetensors metadata ${k} must be a string, got ${typeof v}`);
    }
    header.__metadata__ = metadata;
  }
  let offset = 0;
  for (const name of names) {
    const { data, shape } = tensors[name];
    const dtype = DTYPE_OF_ARRAY.get(data?.constructor);
    if (!dtype) throw new Err(`tensor ${name}: unsupported array type ${data?.constructor?.name}`);
    if (!Array.isArray(shape) || numel(shape) !== data.length) {
      throw new Err(`tensor ${name}: shape ${JSON.stringify(shape)} holds ${Array.isArray(shape) ? numel(shape) : 'no'} values, data has ${data.length}`);
    }
    header[name] = { dtype, shape, data_offsets: [offset, offset + data.byteLength] };
    offset += data.byteLength;
  }
  const encoder = new TextEncoder();
  let hbytes = encoder.encode(JSON.stringify(header));
  hbytes = encoder.encode(JSON.stringify(header) + ' '.repeat((8 - (hbytes.length % 8)) % 8));
  const out = new Uint8Array(8 + hbytes.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(hbytes.length), true);
  out.set(hbytes, 8);
  let pos = 8 + hbytes.length;
  for (const name of names) {
    const { data } = tensors[name];
    out.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), pos);
    pos += data.byteLength;
  }
  return out;
}
