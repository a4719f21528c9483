// Browser test of the web console (issue 5): headless Chromium, driven by
// playwright-core, logs in with the admin token, creates an address through
// the form, sees it in the addresses table, sees its stored-message count
// rise while a client sends to it through the router, browses its first
// messages on its page, and makes an address with a policy.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { chromium } from 'playwright-core';
import { startSystem, binary, chromiumPath, root, createAddress } from './system.mjs';

const STEP = 15000; // bound on each wait in the browser
const SCREENSHOT = join(root, 'target', 'browser-screenshots', 'console.png');

/** Runs `flotilla send ADDRESS --count 20` again and again until stopped. */
function keepSending(address, url) {
  let stopped = false;
  let batches = 0;
  const errors = [];
  const done = (async () => {
    for (let i = 0; i < 500 && !stopped; i++) {
      await new Promise((resolve) => {
        execFile(binary(), ['send', address, '--count', '20', '--timeout', '5', '--url', url],
          { timeout: 10000 }, (err, _stdout, stderr) => {
            if (err) errors.push(`${err.message.split('\n')[0]} ${stderr.trim().split('\n').pop() || ''}`);
            else batches += 1;
            resolve();
          });
      });
      // Pacing, not waiting for anything: a steady trickle of batches.
      if (!stopped) await delay(200);
    }
  })();
  return {
    stop: async () => { stopped = true; await done; return { batches, errors }; },
  };
}

/** The number in column `k` (a td with class k) of the row for `address`. */
function cellNumber(page, address, k) {
  return page.locator(`#address-rows tr[data-address="${address}"] td.${k}`).textContent({ timeout: STEP })
    .then((t) => Number(t));
}

test('create an address in the console and watch its stored count rise while a client sends', { timeout: 60000 }, async (t) => {
  const system = await startSystem();
  const url = `http://127.0.0.1:${system.consolePort}/`;
  const amqp = `amqp://127.0.0.1:${system.routerPort}`;
  t.diagnostic(`console ${url}, router ${amqp}, data in ${system.dir}`);
  let browser = null;
  let page = null;
  let sender = null;
  const pageErrors = [];
  let ok = false;
  try {
    browser = await chromium.launch({ executablePath: chromiumPath(), headless: true, args: ['--no-sandbox', '--disable-dev-shm-usage'] });
    page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.setDefaultTimeout(STEP);
    page.on('pageerror', (e) => pageErrors.push(String(e)));
    page.on('console', (m) => { if (m.type() === 'error') pageErrors.push(`console: ${m.text()} (${m.location().url})`); });
    page.on('response', (r) => { if (r.status() >= 400) pageErrors.push(`${r.status()} ${r.request().method()} ${r.url()}`); });

    // Log in with the token `flotilla up` made.
    await page.goto(url);
    await page.getByLabel('Admin token').fill(system.token);
    await page.getByRole('button', { name: 'Log in' }).click();
    // The overview is the landing page.
    await page.getByRole('heading', { name: 'Overview', exact: true }).waitFor();
    assert.equal(await page.locator('#login-error').textContent(), '');

    // Pick the default address space.
    await page.getByRole('navigation', { name: 'Pages' }).getByRole('link', { name: 'Address spaces' }).click();
    await page.locator('#spaces').getByRole('link', { name: 'default', exact: true }).click();
    await page.getByRole('heading', { name: 'Address space default' }).waitFor();

    // Create the address through the form.
    const row = await createAddress(page, 'orders', 'queue');
    const cells = await row.locator('td').allTextContents();
    assert.deepEqual(cells.slice(0, 3), ['orders', 'orders', 'queue'], `row: ${JSON.stringify(cells)}`);
    assert.equal(await page.locator('#status').textContent(), '', 'no error shown');

    // A client sends through the router; the table (polled every second)
    // shows the broker's stored count rise, and keep rising.
    sender = keepSending('orders', amqp);
    const stored = (min) => page.waitForFunction(
      (m) => Number(document.querySelector('#address-rows tr[data-address="orders"] td.stored')?.textContent) >= m,
      min, { timeout: 20000 });
    await stored(20);
    const first = await cellNumber(page, 'orders', 'stored');
    await stored(first + 20);
    const second = await cellNumber(page, 'orders', 'stored');
    assert.ok(second > first, `stored went from ${first} to ${second}`);
    const delivered = await cellNumber(page, 'orders', 'delivered');
    t.diagnostic(`stored ${first} then ${second}; delivered ${delivered}`);

    // The queue's first messages, on its page.
    await row.getByRole('button', { name: 'Messages in orders' }).click();
    await page.getByRole('heading', { name: 'Address orders' }).waitFor();
    await page.locator('#address-message-rows tr').first().waitFor();
    const caption = await page.locator('#address-messages-caption').textContent();
    assert.match(caption, /^Messages in orders \(\d+ of \d+\)$/, caption);
    assert.ok(await page.locator('#address-message-rows tr').count() > 0);
    await page.getByRole('link', { name: 'Back to address space default' }).click();
    await page.getByRole('heading', { name: 'Address space default' }).waitFor();

    // An address with a policy, made through the form's policy fields.
    const form = page.locator('#address-form');
    await form.getByLabel('Name', { exact: true }).fill('limited');
    await form.getByLabel('Address', { exact: true }).fill('limited');
    await form.getByLabel('Type', { exact: true }).selectOption('queue');
    await form.locator('summary').click();
    await form.getByLabel('Max depth (messages)').fill('5');
    await form.getByLabel('When full').selectOption('dropOldest');
    await form.getByRole('button', { name: 'Create' }).click();
    const limited = page.locator('#address-rows tr[data-address="limited"]');
    await limited.waitFor();
    const title = await limited.getAttribute('title');
    assert.equal(title, 'Policy: {"maxDepth":5,"overflow":"dropOldest"}');

    mkdirSync(join(root, 'target', 'browser-screenshots'), { recursive: true });
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
    console.log(`screenshot: ${SCREENSHOT}`);

    assert.deepEqual(pageErrors, [], 'no errors in the page');
    ok = true;
  } finally {
    if (sender) {
      const { batches, errors } = await sender.stop();
      t.diagnostic(`sender: ${batches} batches of 20 accepted, ${errors.length} failed${errors.length ? `: ${errors.slice(0, 3).join('; ')}` : ''}`);
    }
    if (!ok && page) {
      const failed = join(root, 'target', 'browser-screenshots', 'console-failed.png');
      mkdirSync(join(root, 'target', 'browser-screenshots'), { recursive: true });
      await page.screenshot({ path: failed, fullPage: true }).then(() => console.log(`screenshot: ${failed}`), () => {});
      if (pageErrors.length) console.log(`page errors:\n${pageErrors.join('\n')}`);
    }
    if (browser) await browser.close();
    await system.stop();
    if (ok) system.remove();
    else console.log(`flotilla log: ${system.logPath}\n${system.tail()}`);
  }
});
