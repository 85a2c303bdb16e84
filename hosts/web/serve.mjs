#!/usr/bin/env node
// Static server for the browser host (Node built-ins only).
//
//   node hosts/web/serve.mjs --artifacts artifacts [--data DIR] [--port 8000] [--host 127.0.0.1]
//
// Serves
//   /              hosts/web/ (index.html, corpus.txt, ...; not node_modules)
//   /hosts/web/... hosts/web/ again (app.mjs, lib.mjs), and
//   /hosts/common/... hosts/common/ (the contract code shared with hosts/node), and
//   /contract/...  contract/'s JSON files (constants.json, the schema, the vectors):
//                  the repository's layout, so the modules' relative imports
//                  (../common/x.mjs, ../../contract/constants.json) resolve as on disk
//   /ort/...       node_modules/onnxruntime-web/dist/ (ort.*.mjs and the .wasm files)
//   /tokenizers/... node_modules/@huggingface/tokenizers/dist/ (tokenizer.json in the page)
//   /artifacts/... the folder given by --artifacts (read-only), e.g. /artifacts/tiny/manifest.json
//   /data/...      the folder given by --data, when given (batch files for ?batches=)
// Every response carries COOP/COEP headers, so the page is cross-origin isolated and
// onnxruntime-web may use its threaded wasm build. --port 0 picks a free port; the first
// line printed is the page's URL.
//
// Only regular files are served, and only where their real path (symlinks resolved) lies
// inside the real path of their folder: the mount's, or, under /artifacts/, the artifact
// folder's (a subfolder holding a manifest.json, which may itself be a symlink: that is how
// a folder of artifact folders is put together). A symlink that leads elsewhere is 404.
// A --host that is not a loopback address gets a warning: the network can then read it all.

import { createServer } from 'node:http';
import { closeSync, constants, createReadStream, existsSync, fstatSync, openSync, readdirSync, realpathSync, statSync } from 'node:fs';
import { BlockList, isIP } from 'node:net';
import { dirname, extname, join, resolve, sep } from 'node:path';
import { pipeline } from 'node:stream';
import { fileURLToPath } from 'node:url';

const HERE = realpathSync(dirname(fileURLToPath(import.meta.url)));
const COMMON = realpathSync(join(HERE, '..', 'common'));
const CONTRACT = realpathSync(join(HERE, '..', '..', 'contract'));

const MIME = {
  '.html': 'text/html; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json; charset=utf-8',
  '.txt': 'text/plain; charset=utf-8',
  '.map': 'application/json; charset=utf-8',
  '.wasm': 'application/wasm',
  '.onnx': 'application/octet-stream',
  '.safetensors': 'application/octet-stream',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
  '.ico': 'image/x-icon',
};

function usage(msg) {
  if (msg) process.stderr.write(`serve.mjs: ${msg}\n`);
  process.stderr.write(
    'usage: node hosts/web/serve.mjs --artifacts DIR [--data DIR] [--port N (0 = any free port)] [--host ADDR]\n',
  );
  process.exit(2);
}

function parseArgs(argv) {
  const opts = { artifacts: null, data: null, port: 8000, host: '127.0.0.1' };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const [key, inline] = a.startsWith('--') && a.includes('=') ? a.split(/=(.*)/s, 2) : [a, undefined];
    const value = () => {
      if (inline !== undefined) return inline;
      if (i + 1 >= argv.length) usage(`${key} needs a value`);
      return argv[++i];
    };
    switch (key) {
      case '--artifacts': opts.artifacts = value(); break;
      case '--data': opts.data = value(); break;
      case '--port': {
        const v = value();
        const n = Number(v);
        if (!/^\d+$/.test(v) || n > 65535) usage(`--port must be an integer in [0, 65535], got ${JSON.stringify(v)}`);
        opts.port = n;
        break;
      }
      case '--host': opts.host = value(); break;
      case '-h': case '--help': usage();
      // falls through (usage exits)
      default: usage(`unknown argument ${JSON.stringify(a)}`);
    }
  }
  return opts;
}

/** The folder's real path (symlinks resolved): what served files must lie inside. */
function checkDir(path, flag) {
  const full = resolve(path);
  let st;
  try { st = statSync(full); } catch { usage(`${flag} ${JSON.stringify(path)} does not exist`); }
  if (!st.isDirectory()) usage(`${flag} ${JSON.stringify(path)} is not a folder`);
  return realpathSync(full);
}

const LOOPBACK = new BlockList();
LOOPBACK.addSubnet('127.0.0.0', 8, 'ipv4');
LOOPBACK.addAddress('::1', 'ipv6');
LOOPBACK.addSubnet('::ffff:127.0.0.0', 104, 'ipv6');

/** Whether --host keeps the server on this machine: 127.0.0.0/8, ::1 or localhost. */
function isLoopback(host) {
  const h = host.replace(/^\[(.*)\]$/, '$1').toLowerCase();
  if (h === 'localhost') return true;
  const family = isIP(h);
  return family !== 0 && LOOPBACK.check(h, family === 4 ? 'ipv4' : 'ipv6');
}

// The artifact folder to suggest in the printed URL: the mount itself when it holds a
// manifest, else "tiny" when present, else the first subfolder with a manifest.
function suggestArtifacts(root) {
  if (existsSync(join(root, 'manifest.json'))) return '/artifacts';
  let names = [];
  try {
    names = readdirSync(root, { withFileTypes: true }).filter((d) => d.isDirectory()).map((d) => d.name).sort();
  } catch { /* unreadable: no suggestion */ }
  const withManifest = names.filter((n) => existsSync(join(root, n, 'manifest.json')));
  if (withManifest.includes('tiny')) return '/artifacts/tiny';
  return withManifest.length ? `/artifacts/${encodeURIComponent(withManifest[0])}` : null;
}

const opts = parseArgs(process.argv.slice(2));
if (!opts.artifacts) usage('--artifacts DIR is required (a folder holding artifact folders, or one artifact folder)');
let ortDist = join(HERE, 'node_modules', 'onnxruntime-web', 'dist');
if (!existsSync(join(ortDist, 'ort.wasm.min.mjs'))) {
  process.stderr.write(`serve.mjs: ${ortDist} is missing: run \`npm ci\` in ${HERE} first\n`);
  process.exit(1);
}
ortDist = realpathSync(ortDist);
let tokDist = join(HERE, 'node_modules', '@huggingface', 'tokenizers', 'dist');
if (!existsSync(join(tokDist, 'tokenizers.min.mjs'))) {
  process.stderr.write(`serve.mjs: ${tokDist} is missing: run \`npm ci\` in ${HERE} first\n`);
  process.exit(1);
}
tokDist = realpathSync(tokDist);

// Mount table: [URL prefix, folder, what it serves]. The first matching prefix serves; '/' last.
const artifactsRoot = checkDir(opts.artifacts, '--artifacts');
const anyFile = () => true;
const notNodeModules = (parts) => parts[0] !== 'node_modules'; // node_modules only via /ort/ and /tokenizers/
const mounts = [
  ['/ort/', ortDist, anyFile],
  ['/tokenizers/', tokDist, anyFile],
  ['/artifacts/', artifactsRoot, anyFile],
  ['/hosts/common/', COMMON, anyFile],
  ['/hosts/web/', HERE, notNodeModules],
  ['/contract/', CONTRACT, (parts) => parts.length > 0 && extname(parts[parts.length - 1]) === '.json'],
];
if (opts.data) mounts.push(['/data/', checkDir(opts.data, '--data'), anyFile]);
mounts.push(['/', HERE, notNodeModules]);

const inside = (path, root) => path === root || path.startsWith(root.endsWith(sep) ? root : root + sep);

/** {full, root}: the file a URL path names and the real folder it must stay inside; or null. */
function resolvePath(urlPath) {
  for (const [prefix, root, serves] of mounts) {
    if (!urlPath.startsWith(prefix)) continue;
    const rel = urlPath.slice(prefix.length);
    const parts = rel.split('/').filter((p) => p !== '');
    // No dot segments, no hidden files, no backslashes or NULs.
    if (parts.some((p) => p.startsWith('.') || p.includes('\\') || p.includes('\0'))) return null;
    if (!serves(parts)) return null;
    const full = resolve(root, ...parts);
    if (!inside(full, root)) return null;
    let fence = root;
    if (prefix === '/artifacts/' && parts.length >= 2 && !existsSync(join(root, 'manifest.json'))) {
      const folder = join(root, parts[0]);
      if (existsSync(join(folder, 'manifest.json'))) {
        try { fence = realpathSync(folder); } catch { return null; }
      }
    }
    return { full, root: fence };
  }
  return null;
}

/**
 * Open the regular file a URL path names: {fd, st, path}, or null (404) when there is none,
 * or when its real path leaves its folder. A folder serves its index.html.
 */
function openServed(urlPath) {
  const hit = resolvePath(urlPath);
  if (!hit) return null;
  let { full } = hit;
  for (let hop = 0; hop < 2; hop++) {
    let real;
    let st;
    try {
      real = realpathSync(full);
      st = statSync(real);
    } catch {
      return null;
    }
    if (!inside(real, hit.root)) return null;
    if (st.isDirectory() && hop === 0) {
      full = join(real, 'index.html');
      continue;
    }
    if (!st.isFile()) return null;
    // O_NOFOLLOW and the inode check: a file swapped for a symlink or another file after the
    // checks above is not served; O_NONBLOCK: a swapped-in FIFO cannot hang the server.
    let fd;
    try {
      fd = openSync(real, constants.O_RDONLY | (constants.O_NOFOLLOW ?? 0) | (constants.O_NONBLOCK ?? 0));
    } catch {
      return null;
    }
    const opened = fstatSync(fd);
    if (!opened.isFile() || opened.ino !== st.ino || opened.dev !== st.dev) {
      closeSync(fd);
      return null;
    }
    return { fd, st: opened, path: real };
  }
  return null;
}

function send(res, status, body, headers = {}) {
  res.writeHead(status, { 'Content-Type': 'text/plain; charset=utf-8', ...headers });
  res.end(body);
}

const server = createServer((req, res) => {
  // Cross-origin isolation (SharedArrayBuffer, wasm threads); everything is same-origin.
  res.setHeader('Cross-Origin-Opener-Policy', 'same-origin');
  res.setHeader('Cross-Origin-Embedder-Policy', 'require-corp');
  res.setHeader('Cross-Origin-Resource-Policy', 'same-origin');
  res.setHeader('Cache-Control', 'no-cache');
  res.setHeader('X-Content-Type-Options', 'nosniff');
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    send(res, 405, 'method not allowed\n', { Allow: 'GET, HEAD' });
    return;
  }
  let urlPath;
  try {
    urlPath = decodeURIComponent(new URL(req.url, 'http://localhost').pathname);
  } catch {
    send(res, 400, 'bad request path\n');
    return;
  }
  const served = openServed(urlPath);
  if (!served) {
    send(res, 404, `not found: ${urlPath}\n`);
    return;
  }
  const { fd, st, path: full } = served;
  // Revalidation (no-cache + ETag): unchanged files answer 304, so the browser keeps its
  // compiled wasm between page loads, and a rebuilt artifact is never served stale.
  const etag = `"${st.size.toString(16)}-${Math.floor(st.mtimeMs).toString(16)}"`;
  res.setHeader('ETag', etag);
  res.setHeader('Last-Modified', st.mtime.toUTCString());
  if (req.headers['if-none-match'] === etag) {
    closeSync(fd);
    res.writeHead(304);
    res.end();
    return;
  }
  res.writeHead(200, {
    'Content-Type': MIME[extname(full).toLowerCase()] || 'application/octet-stream',
    'Content-Length': st.size,
  });
  if (req.method === 'HEAD') {
    closeSync(fd);
    res.end();
    return;
  }
  // pipeline closes the file when the client goes away mid-transfer, too.
  pipeline(createReadStream(full, { fd, start: 0, end: Math.max(0, st.size - 1) }), res, () => {});
});

server.on('error', (err) => {
  process.stderr.write(`serve.mjs: cannot listen on ${opts.host}:${opts.port}: ${err.message}\n`);
  process.exit(1);
});

server.listen(opts.port, opts.host, () => {
  const { port } = server.address();
  const host = opts.host.includes(':') ? `[${opts.host}]` : opts.host;
  const suggestion = suggestArtifacts(artifactsRoot);
  const query = suggestion && suggestion !== '/artifacts/tiny' ? `?artifacts=${suggestion}` : '';
  process.stdout.write(`http://${host}:${port}/${query}\n`);
  if (!isLoopback(opts.host)) {
    process.stderr.write(
      `serve.mjs: warning: --host ${opts.host} is not a loopback address: the artifacts (${artifactsRoot})` +
        `${opts.data ? ` and the data (${resolve(opts.data)})` : ''} become readable by anyone on the network ` +
        `who can reach port ${port}; use --host 127.0.0.1 to keep them on this machine\n`,
    );
  }
  if (!suggestion) {
    process.stderr.write(
      `serve.mjs: no folder with a manifest.json in ${artifactsRoot}; build one with ` +
        '`python -m graphgen build --config tiny --out <that folder>/tiny`\n',
    );
  }
  process.stdout.write(
    `serving hosts/web, hosts/common and contract/ (JSON), onnxruntime-web at /ort/, ${artifactsRoot} at /artifacts/` +
      (opts.data ? `, ${resolve(opts.data)} at /data/` : '') +
      ' (Ctrl-C stops)\n',
  );
});

for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(0));
