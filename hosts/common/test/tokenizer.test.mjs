import assert from 'node:assert/strict';
import { test } from 'node:test';

import { KNOWN_KINDS, TOKENIZER_FILE, decodeText, makeTokenizer, tokenizerEntry } from '../tokenizer.mjs';

class EntryError extends Error {}

const SHA = 'ab'.repeat(32);
const hfManifest = (tok = {}, files = { [TOKENIZER_FILE]: { sha256: SHA, bytes: 10 } }) => ({
  config: { vocab: 300 },
  files,
  tokenizer: { kind: 'huggingface', file: TOKENIZER_FILE, sha256: SHA, vocab_size: 300, ...tok },
});

test('a manifest without a tokenizer entry is byte-level', () => {
  assert.deepEqual(tokenizerEntry({ config: { vocab: 256 }, files: {} }), { kind: 'bytes', vocab_size: 256 });
  assert.deepEqual(tokenizerEntry({ config: { vocab: 256 }, files: {}, tokenizer: { kind: 'bytes', vocab_size: 256 } }),
    { kind: 'bytes', vocab_size: 256 });
});

test('a huggingface entry is returned with its file and sha256', () => {
  assert.deepEqual(tokenizerEntry(hfManifest()), { kind: 'huggingface', vocab_size: 300, file: TOKENIZER_FILE, sha256: SHA });
  assert.deepEqual(KNOWN_KINDS, ['bytes', 'huggingface']);
});

for (const [name, manifest, needle] of [
  ['an unknown kind', hfManifest({ kind: 'sentencepiece' }), 'tokenizer kind "sentencepiece" is not one this host knows (bytes, huggingface)'],
  ['a tokenizer that is not an object', { ...hfManifest(), tokenizer: 'gpt2' }, 'tokenizer kind "gpt2" is not one this host knows'],
  ['a vocab_size that is not an integer', hfManifest({ vocab_size: 2.5 }), 'tokenizer.vocab_size = 2.5, expected an integer >= 1'],
  ['a bytes tokenizer of another size', { config: { vocab: 300 }, files: {}, tokenizer: { kind: 'bytes', vocab_size: 300 } }, 'a bytes tokenizer has 256'],
  ['more ids than the model', hfManifest({ vocab_size: 301 }), 'larger than config.vocab = 300'],
  ['another file', hfManifest({ file: '../tokenizer.json' }), 'tokenizer.file = "../tokenizer.json", expected "tokenizer.json"'],
  ['a sha256 the files list does not hold', hfManifest({ sha256: 'cd'.repeat(32) }), 'is not the sha256 files lists for "tokenizer.json"'],
  ['a file the manifest does not list', hfManifest({}, {}), 'is not the sha256 files lists'],
]) {
  test(`tokenizerEntry refuses ${name}`, () => {
    assert.throws(() => tokenizerEntry(manifest, 'm.json', EntryError), (e) => e instanceof EntryError && e.message.startsWith('m.json: ') && e.message.includes(needle));
  });
}

test('the byte tokenizer: UTF-8 bytes in, text out with U+FFFD for a split character', () => {
  const tok = makeTokenizer({ kind: 'bytes', vocab_size: 256 });
  assert.deepEqual(tok.encode('é!'), [0xc3, 0xa9, 0x21]);
  assert.equal(tok.decode([0x41, 0xc3]), 'A\ufffd');
  assert.equal(tok.decode([]), '');
});

test('a huggingface tokenizer needs the library and a readable tokenizer.json', () => {
  const entry = { kind: 'huggingface', vocab_size: 300, file: TOKENIZER_FILE, sha256: SHA };
  assert.throws(() => makeTokenizer(entry, { json: '{}' }, EntryError), (e) => e instanceof EntryError && e.message.includes('no tokenizer library'));
  assert.throws(() => makeTokenizer(entry, { json: '{"model": ', Tokenizer: class {} }, EntryError),
    (e) => e instanceof EntryError && e.message.includes('not a readable tokenizer.json'));
});

test('decodeText reads as Python does: a BOM kept, invalid bytes replaced', () => {
  assert.equal(decodeText(Uint8Array.of(0xef, 0xbb, 0xbf, 0x61, 0xff, 0x62)), '\ufeffa\ufffdb');
});
