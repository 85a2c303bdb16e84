// The artifact folder's tokenizer, for both JavaScript hosts: text -> token ids for training,
// ids -> text for samples. The manifest's `tokenizer` entry (contract/constants.json "tokenizer";
// contract/manifest.py tokenizer_of) names the kind:
//   bytes        ids are the UTF-8 bytes of the text (folders that record no tokenizer too);
//   huggingface  the folder's tokenizer.json (Hugging Face `tokenizers` format), run by
//                @huggingface/tokenizers, the JavaScript implementation transformers.js uses:
//                the ids of Python's `tokenizers` (runtimes/tokenizer.py) on the same text,
//                without special tokens added (tests/test_node_host.py, tests/test_web_host.py).
// Any other kind is refused: a host that cannot tokenize as the folder was trained must not
// train it on other ids.
//
// The library is passed in, not imported here: the Node host imports it from its own
// node_modules, the page from the path serve.mjs mounts it at, and this file is the same
// module for both (a bare import would resolve in neither from hosts/common/).
//
// Checks throw `new Err(message)`: Err defaults to Error; hosts/node passes its own classes.

import { CONSTANTS } from './contract.mjs';
import { isObject, own, show } from './util.mjs';

const SPEC = CONSTANTS.tokenizer;
/** The kinds these hosts tokenize; a manifest naming another is refused. */
export const KNOWN_KINDS = Object.freeze(['bytes', 'huggingface']);
/** The file a huggingface tokenizer lives in, inside the artifact folder. */
export const TOKENIZER_FILE = SPEC.file;

/**
 * The manifest's tokenizer entry, checked as contract/manifest.py checks it, and against the
 * kinds these hosts know: {kind, vocab_size, file?, sha256?}. A manifest without one is
 * byte-level. Throws `new Err(message)` naming `where`.
 */
export function tokenizerEntry(manifest, where = 'manifest.json', Err = Error) {
  if (!own(manifest, 'tokenizer')) return { kind: 'bytes', vocab_size: SPEC.bytes_vocab_size };
  const tok = manifest.tokenizer;
  if (!isObject(tok) || !KNOWN_KINDS.includes(tok.kind)) {
    throw new Err(
      `${where}: tokenizer kind ${show(isObject(tok) ? tok.kind : tok)} is not one this host knows ` +
        `(${KNOWN_KINDS.join(', ')}); it cannot produce the token ids this model was built for`,
    );
  }
  const size = tok.vocab_size;
  if (!Number.isInteger(size) || size < 1) throw new Err(`${where}: tokenizer.vocab_size = ${show(size)}, expected an integer >= 1`);
  if (tok.kind === 'bytes') {
    if (size !== SPEC.bytes_vocab_size) throw new Err(`${where}: tokenizer.vocab_size = ${size}, but a bytes tokenizer has ${SPEC.bytes_vocab_size}`);
    return { kind: 'bytes', vocab_size: size };
  }
  const vocab = manifest.config?.vocab;
  if (size > vocab) throw new Err(`${where}: tokenizer.vocab_size = ${size} is larger than config.vocab = ${vocab}: its ids would not fit the model`);
  if (tok.file !== TOKENIZER_FILE) throw new Err(`${where}: tokenizer.file = ${show(tok.file)}, expected ${show(TOKENIZER_FILE)}`);
  const listed = manifest.files?.[TOKENIZER_FILE];
  if (!isObject(listed) || listed.sha256 !== tok.sha256) {
    throw new Err(`${where}: tokenizer.sha256 = ${show(tok.sha256)} is not the sha256 files lists for ${show(TOKENIZER_FILE)}`);
  }
  return { kind: tok.kind, vocab_size: size, file: tok.file, sha256: tok.sha256 };
}

/**
 * A tokenizer for `entry` (tokenizerEntry's): {kind, vocabSize, encode(text) -> number[],
 * decode(ids) -> string}. For huggingface, `json` is tokenizer.json's text or bytes (already
 * checked against the manifest's sha256 by the caller) and `Tokenizer` the class of
 * @huggingface/tokenizers. `where` names the file in messages.
 */
export function makeTokenizer(entry, { json, Tokenizer, where = TOKENIZER_FILE } = {}, Err = Error) {
  if (entry.kind === 'bytes') {
    const enc = new TextEncoder();
    return {
      kind: 'bytes',
      vocabSize: entry.vocab_size,
      encode: (text) => Array.from(enc.encode(text)),
      // invalid UTF-8 (a sample cut inside a character) shows as U+FFFD, as Python's errors="replace"
      decode: (ids) => new TextDecoder('utf-8').decode(Uint8Array.from(ids, Number)),
    };
  }
  if (typeof Tokenizer !== 'function') throw new Err(`${where}: no tokenizer library was given to read it (@huggingface/tokenizers)`);
  let parsed;
  try {
    parsed = JSON.parse(typeof json === 'string' ? json : new TextDecoder('utf-8').decode(json));
  } catch (e) {
    throw new Err(`${where}: not a readable tokenizer.json (${e.message})`);
  }
  let tok;
  try {
    tok = new Tokenizer(parsed, {});
  } catch (e) {
    throw new Err(`${where}: @huggingface/tokenizers cannot read it (${String(e.message).split('\n')[0]})`);
  }
  const have = tok.get_vocab(true).size;
  if (have !== entry.vocab_size) {
    throw new Err(`${where}: holds ${have} ids, but manifest.json's tokenizer.vocab_size says ${entry.vocab_size} (replaced or from another build)`);
  }
  return {
    kind: 'huggingface',
    vocabSize: entry.vocab_size,
    // add_special_tokens false: the ids of the text alone, as runtimes/tokenizer.py trains on
    encode: (text) => tok.encode(text, { add_special_tokens: false }).ids,
    // Python's Tokenizer.decode(ids, skip_special_tokens=False): no clean-up of spaces
    decode: (ids) => (ids.length === 0 ? '' : tok.decode(Array.from(ids, Number), { skip_special_tokens: false, clean_up_tokenization_spaces: false })),
  };
}

/** A file's bytes as text, as runtimes/data.py reads a corpus: UTF-8, invalid bytes replaced by
 *  U+FFFD, a byte-order mark kept (Python's "utf-8" codec keeps it; TextDecoder drops it unless told). */
export function decodeText(bytes) {
  return new TextDecoder('utf-8', { ignoreBOM: true }).decode(bytes);
}
