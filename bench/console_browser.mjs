// The web console in headless Chromium against a running console (run by
// bench/console_scale.py after it filled one): how long the overview and
// the address list take to be ready after navigation, and what the live
// refresh costs the browser each second (script and layout time from the
// DevTools protocol's Performance metrics, over 10 s of each page).
//
//   node bench/console_browser.mjs URL TOKEN SPACE
//
// Uses tests/browser's playwright-core and Debian's Chromium.
import { createRequire } from 'node:module';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(join(here, '..', 'tests', 'browser', 'package.json'));
const { chromium } = require('playwright-core');
const [url, token, space] = process.argv.slice(2);

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || 'chromium', headless: true, args: ['--no-sandbox', '--disable-dev-shm-usage'] });
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const cdp = await page.context().newCDPSession(page);
await cdp.send('Performance.enable');
const busy = async () => {
  const m = Object.fromEntries((await cdp.send('Performance.getMetrics')).metrics.map((x) => [x.name, x.value]));
  return (m.ScriptDuration + m.LayoutDuration + m.RecalcStyleDuration) * 1000;
};

await page.goto(url);
await page.evaluate((t) => sessionStorage.setItem('flotilla-token', t), token);
const out = {};
for (const [what, hash, ready] of [
  ['overview', '#/', '#totals li .value'],
  ['address list', `#/spaces/${space}`, '#address-rows tr'],
]) {
  const start = Date.now();
  await page.goto(`${url}${hash}`);
  await page.reload();
  await page.locator(ready).first().waitFor({ timeout: 30000 });
  await page.waitForFunction((sel) => document.querySelector(sel)?.textContent !== '', ready);
  const loaded = Date.now() - start;
  const before = await busy();
  await new Promise((r) => setTimeout(r, 10000));
  const perSecond = (await busy() - before) / 10;
  out[what] = { readyMs: loaded, browserMsPerSecond: Math.round(perSecond * 10) / 10 };
}
console.log(JSON.stringify(out));
await browser.close();
