#!/usr/bin/env node
// Drives the page in headless Chromium (playwright-core; the system's /usr/bin/chromium,
// never a downloaded browser): for each --url, open it in a new tab, click Start, wait for
// window.trainDone (or window.trainError), and print one JSON line {log, sample, error, ...}.
// --stop-after N (after a --url) presses Stop once that page has logged N steps.
// --export PATH (after a --url) then clicks Export and saves the download there (its line's
// exportName is the file name the page suggested).
// --screenshot saves a full-page PNG of the first URL once it has finished.
//
//   node hosts/web/drive.mjs --url URL [--stop-after N] [--export PATH] [--url URL2 ...] [--screenshot out.png] [--timeout 60] [--chromium /usr/bin/chromium]
//
// Exit status: 0 all pages trained; 1 some page reported an error (its line says which);
// 2 bad arguments; 3 the browser failed or a page timed out (--timeout seconds per wait).
// The pages' console output goes to stderr.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

function usage(msg) {
  if (msg) process.stderr.write(`drive.mjs: ${msg}\n`);
  process.stderr.write('usage: node hosts/web/drive.mjs --url URL [--stop-after N] [--export PATH] [--url URL ...] [--screenshot PATH] [--timeout SECONDS] [--chromium PATH] [--webgpu]\n');
  process.exit(2);
}

const opts = { urls: [], screenshot: null, timeout: 60, chromium: '/usr/bin/chromium', webgpu: false };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const key = argv[i];
  const val = () => (i + 1 < argv.length ? argv[++i] : usage(`${key} needs a value`));
  if (key === '--url') opts.urls.push({ url: val(), stopAfter: null, exportTo: null });
  else if (key === '--stop-after') {
    const n = Number(val());
    if (!Number.isInteger(n) || n < 1) usage('--stop-after must be an integer >= 1');
    if (opts.urls.length === 0) usage('--stop-after follows the --url it applies to');
    opts.urls[opts.urls.length - 1].stopAfter = n;
  }
  else if (key === '--export') {
    if (opts.urls.length === 0) usage('--export follows the --url it applies to');
    opts.urls[opts.urls.length - 1].exportTo = val();
  }
  else if (key === '--screenshot') opts.screenshot = val();
  else if (key === '--timeout') {
    opts.timeout = Number(val());
    if (!(opts.timeout > 0)) usage('--timeout must be a positive number of seconds');
  } else if (key === '--chromium') opts.chromium = val();
  else if (key === '--webgpu') opts.webgpu = true;
  else usage(`unknown argument ${JSON.stringify(key)}`);
}
if (opts.urls.length === 0) usage('--url is required');

const ARGS = [
  '--headless', '--no-sandbox', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  // --webgpu: a WebGPU adapter without a GPU, SwiftShader's (Chromium's software Vulkan);
  // headless Chromium on Linux offers none by default. Otherwise no GPU process work at all.
  ...(opts.webgpu ? ['--enable-unsafe-webgpu', '--use-webgpu-adapter=swiftshader'] : ['--disable-gpu']),
];

async function drivePage(page, { url, stopAfter, exportTo }, screenshot) {
  const deadline = opts.timeout * 1000;
  await page.goto(url, { waitUntil: 'load', timeout: deadline });
  // Ready when Start is enabled, or failed when the page reports an error.
  await page.waitForFunction(
    () => window.trainError || !document.getElementById('start').disabled,
    null, { timeout: deadline, polling: 100 },
  );
  if (!(await page.evaluate(() => window.trainError))) {
    await page.click('#start');
    if (stopAfter) {
      // Press Stop once the page has logged stopAfter steps (it finishes the step in flight).
      await page.waitForFunction(
        (n) => window.trainError || window.trainDone === true || window.trainLog.length >= n,
        stopAfter, { timeout: deadline, polling: 20 },
      );
      if (!(await page.evaluate(() => window.trainError || window.trainDone))) await page.click('#start');
    }
    await page.waitForFunction(() => window.trainError || window.trainDone === true, null, { timeout: deadline, polling: 100 });
  }
  let exportName = null;
  if (exportTo && !(await page.evaluate(() => window.trainError))) {
    // The real button and download path: Blob URL, <a download>, the browser's download.
    const [download] = await Promise.all([
      page.waitForEvent('download', { timeout: deadline }),
      page.click('#export'),
    ]);
    await download.saveAs(exportTo);
    exportName = download.suggestedFilename();
  }
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  const result = await page.evaluate(() => ({
    url: location.href,
    log: window.trainLog,
    sample: window.sample,
    sampleText: document.getElementById('sample').textContent,
    status: document.getElementById('status').textContent,
    backend: document.getElementById('backend').textContent,
    tokensPerSecond: document.getElementById('tps').textContent,
    info: document.getElementById('info').textContent,
    crossOriginIsolated: window.crossOriginIsolated,
    placements: window.placements,
    error: window.trainError,
  }));
  return { ...result, exportName };
}

const profile = mkdtempSync(join(tmpdir(), 'gpt2-web-chromium-'));
let context;
let status = 0;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: opts.chromium,
    headless: true,
    args: ARGS,
    viewport: { width: 1000, height: 900 },
    timeout: 30000,
  });
  for (const [i, target] of opts.urls.entries()) {
    const page = await context.newPage();
    page.on('console', (m) => process.stderr.write(`[page ${i} ${m.type()}] ${m.text()}\n`));
    page.on('pageerror', (e) => process.stderr.write(`[page ${i} error] ${e.message}\n`));
    const result = await drivePage(page, target, i === 0 ? opts.screenshot : null);
    await page.close();
    process.stdout.write(JSON.stringify(result) + '\n');
    if (result.error) {
      process.stderr.write(`drive.mjs: ${target.url}: the page reported an error: ${result.error}\n`);
      status = 1;
    }
  }
} catch (e) {
  process.stderr.write(`drive.mjs: ${e.stack || e.message}\n`);
  status = 3;
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
process.exit(status);
