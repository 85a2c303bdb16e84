// Small helpers for the shared checkers' messages.

export const isObject = (x) => x !== null && typeof x === 'object' && !Array.isArray(x);
export const kindOf = (x) => (x === null ? 'null' : Array.isArray(x) ? 'list' : typeof x);
export const own = (obj, key) => Object.prototype.hasOwnProperty.call(obj, key);
export const numel = (shape) => shape.reduce((a, b) => a * b, 1);
export const sameShape = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);

/** A value for an error message: JSON, cut to a readable length. */
export function show(x) {
  let s;
  try {
    s = JSON.stringify(x);
  } catch {
    s = undefined;
  }
  if (s === undefined) s = String(x);
  return s.length > 120 ? `${s.slice(0, 117)}...` : s;
}

/** Flat index i of an array of shape `dims` as "i0, i1, ...". */
export function unravel(i, dims) {
  const idx = [];
  for (let k = dims.length - 1; k >= 0; k--) {
    idx.unshift(i % dims[k]);
    i = Math.floor(i / dims[k]);
  }
  return idx.join(', ');
}
