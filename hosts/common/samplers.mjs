// Seeded batch samplers. mulberry32 is the hosts' PRNG (tests/test_web_host.py replays it in
// Python); both are held to contract/vectors/samplers.json. Batches come in the shape of
// batches.mjs: {tokens, positions, labels}, each {data: BigInt64Array, dims: [B, T]}.
//
// Checks throw `new Err(message)`: Err defaults to Error; hosts/node passes its own classes.

/** mulberry32: a small seeded 32-bit PRNG; returns a function giving floats in [0, 1). */
export function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

function emptyBatch(batch, seq) {
  const dims = [batch, seq];
  const ids = () => ({ data: new BigInt64Array(batch * seq), dims: dims.slice() });
  return { tokens: ids(), positions: ids(), labels: ids() };
}

/**
 * Random windows of a byte array (byte tokens), like runtimes.data.BatchSampler but with
 * mulberry32's stream: for each row, offset o = floor(rand() * (len - T)), tokens
 * bytes[o:o+T], labels bytes[o+1:o+T+1], positions 0..T-1. Returns a function giving the
 * next batch; its `offsets` lists each row's o. `bytes` may be any array of token ids
 * (tokenSampler); `unit` names them in the message for a text too short.
 */
export function byteSampler(bytes, batch, seq, seed, Err = Error, unit = 'bytes') {
  if (bytes.length < seq + 1) {
    throw new Err(`the text holds ${bytes.length} ${unit}; one batch of sequence length T=${seq} needs at least T+1 = ${seq + 1}`);
  }
  const rand = mulberry32(seed);
  const high = bytes.length - seq; // offsets 0 .. len-T-1
  return () => {
    const out = emptyBatch(batch, seq);
    out.offsets = [];
    for (let r = 0; r < batch; r++) {
      const o = Math.floor(rand() * high);
      out.offsets.push(o);
      for (let j = 0; j < seq; j++) {
        out.tokens.data[r * seq + j] = BigInt(bytes[o + j]);
        out.labels.data[r * seq + j] = BigInt(bytes[o + j + 1]);
        out.positions.data[r * seq + j] = BigInt(j);
      }
    }
    return out;
  };
}

/** byteSampler's windows over a tokenizer's ids (hosts/common/tokenizer.mjs encode) of a text. */
export function tokenSampler(ids, batch, seq, seed, Err = Error) {
  return byteSampler(ids, batch, seq, seed, Err, 'tokens');
}

/** Seeded uniformly random token ids in [0, vocab); labels are the next id of the same row. */
export function randomSampler(vocab, batch, seq, seed) {
  const rand = mulberry32(seed);
  const row = new Array(seq + 1).fill(0);
  return () => {
    const out = emptyBatch(batch, seq);
    for (let r = 0; r < batch; r++) {
      for (let j = 0; j <= seq; j++) row[j] = Math.floor(rand() * vocab);
      for (let j = 0; j < seq; j++) {
        out.tokens.data[r * seq + j] = BigInt(row[j]);
        out.labels.data[r * seq + j] = BigInt(row[j + 1]);
        out.positions.data[r * seq + j] = BigInt(j);
      }
    }
    return out;
  };
}
