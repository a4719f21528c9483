// Browser test of the console's overview, map and drill-down (issue 15):
// `flotilla up` plus two more routers in its mesh. While a client sends,
// the overview shows messages moving; the map shows three routers and a
// broker, and a router killed turns red; the overview leads to an address
// and the address to a connection, which its page closes. axe-core checks
// every page for serious accessibility violations. Screenshots of each
// page go to target/browser-screenshots/.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { chromium } from 'playwright-core';
import { startSystem, startRouter, binary, chromiumPath, axe, shot, SHOTS } from './system.mjs';

const STEP = 15000;

/** Sends batches to a queue through the router until stopped. */
function keepSending(address, url) {
  let stopped = false;
  const done = (async () => {
    for (let i = 0; i < 1000 && !stopped; i++) {
      await new Promise((resolve) => {
        execFile(binary(), ['send', address, '--count', '20', '--timeout', '5', '--url', url], { timeout: 10000 }, () => resolve());
      });
      if (!stopped) await delay(100);
    }
  })();
  return { stop: async () => { stopped = true; await done; } };
}

/** A receiver on a router-held (anycast) address: a connection to drill into. */
function receiver(address, url) {
  const proc = spawn(binary(), ['receive', address, '--url', url, '--timeout', '0'], { stdio: 'ignore' });
  const exit = new Promise((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));
  return { exit, kill: () => { try { proc.kill('SIGKILL'); } catch { /* gone */ } } };
}


test('overview, map and drill-down: rates move, a killed router turns red, a connection closes from its page', { timeout: 120000 }, async (t) => {
  const system = await startSystem(20000, ['--inter-router', '127.0.0.1:0']);
  const url = `http://127.0.0.1:${system.consolePort}/`;
  const amqp = `amqp://127.0.0.1:${system.routerPort}`;
  const routers = [];
  let browser = null;
  let page = null;
  let sender = null;
  let rx = null;
  const pageErrors = [];
  let ok = false;
  try {
    routers.push(await startRouter(system, 'r-b'));
    routers.push(await startRouter(system, 'r-c'));
    browser = await chromium.launch({ executablePath: chromiumPath(), headless: true, args: ['--no-sandbox', '--disable-dev-shm-usage'] });
    page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.setDefaultTimeout(STEP);
    page.on('pageerror', (e) => pageErrors.push(String(e)));
    page.on('console', (m) => { if (m.type() === 'error') pageErrors.push(`console: ${m.text()}`); });

    await page.goto(url);
    await page.getByLabel('Admin token').fill(system.token);
    await page.getByRole('button', { name: 'Log in' }).click();
    await page.getByRole('heading', { name: 'Overview', exact: true }).waitFor();
    await axe(page, 'overview');

    // A queue, and a client sending to it: the overview's chart and its
    // busiest addresses show messages coming in.
    const create = (name, type) => page.evaluate(async ([n, k]) => {
      const r = await fetch('/api/v1/addressspaces/default/addresses', {
        method: 'POST',
        headers: { Authorization: 'Bearer ' + sessionStorage.getItem('flotilla-token'), 'Content-Type': 'application/json' },
        body: JSON.stringify({ metadata: { name: n }, spec: { address: n, type: k } }),
      });
      return r.status;
    }, [name, type]);
    assert.equal(await create('orders', 'queue'), 201);
    assert.equal(await create('alerts', 'anycast'), 201);
    sender = keepSending('orders', amqp);
    await page.waitForFunction(() => /in: [1-9]/.test(document.querySelector('#rates-chart svg')?.getAttribute('aria-label') || ''), null, { timeout: 30000 });
    const busy = page.locator('#busiest-rows tr').filter({ hasText: 'orders' });
    await busy.waitFor();
    await page.waitForFunction(() => Number(document.querySelector('#totals li:nth-child(2) .value')?.textContent.replace(/,/g, '')) >= 1);
    await shot(page, 'overview');

    // Drill down: the busiest address's page.
    await busy.getByRole('link', { name: 'orders' }).click();
    await page.getByRole('heading', { name: 'Address orders' }).waitFor();
    const facts = await page.locator('#address-facts').textContent();
    assert.match(facts, /Held bybroker-0/, facts);
    await page.waitForFunction(() => /in: [1-9]/.test(document.querySelector('#address-rate-chart svg')?.getAttribute('aria-label') || ''), null, { timeout: 20000 });
    await page.getByRole('button', { name: 'Show the first messages' }).click();
    await page.locator('#address-message-rows tr').first().waitFor();
    await sender.stop();
    sender = null;
    // A consumer of the queue (its link routed to the broker) is listed
    // with its connection.
    const consumer = receiver('orders', amqp);
    await page.locator('#address-link-rows tr:has(a)').filter({ hasText: /^receiver/ }).first().waitFor({ timeout: 20000 });
    await shot(page, 'address');
    await axe(page, 'address page');
    consumer.kill();
    await consumer.exit;

    // A receiver on an anycast address: from its address page to its
    // connection's page, which closes it.
    rx = receiver('alerts', amqp);
    await page.goto(`${url}#/spaces/default/addresses/alerts`);
    const link = page.locator('#address-link-rows tr:has(a)').filter({ hasText: /^receiver/ }).first();
    await link.waitFor({ timeout: 20000 });
    await link.getByRole('link').first().click();
    await page.getByRole('heading', { name: /^Connection \d+ on / }).waitFor();
    await page.locator('#connection-link-rows tr').filter({ hasText: 'alerts' }).waitFor();
    await shot(page, 'connection');
    await axe(page, 'connection page');
    await page.getByRole('button', { name: 'Close this connection' }).click();
    await page.waitForFunction(() => /closed/.test(document.querySelector('#connection-state')?.textContent || ''), null, { timeout: 20000 });
    const ended = await Promise.race([rx.exit, delay(15000).then(() => null)]);
    assert.ok(ended, 'the receiver saw its connection closed');
    rx = null;

    // The map: three routers and a broker, each up.
    await page.getByRole('navigation', { name: 'Pages' }).getByRole('link', { name: 'Mesh map' }).click();
    await page.getByRole('heading', { name: 'Mesh map' }).waitFor();
    const nodes = (kind, state) => page.evaluate(([k, s]) => [...document.querySelectorAll('#map g.map-node')]
      .filter((g) => g.dataset.id.startsWith(k + '/') && (!s || g.dataset.state === s)).length, [kind, state]);
    await page.waitForFunction(() => [...document.querySelectorAll('#map g.map-node')]
      .filter((g) => g.dataset.id.startsWith('router/') && g.dataset.state === 'up').length === 3, null, { timeout: 30000 });
    assert.equal(await nodes('broker', 'up'), 1, 'one broker, up');
    assert.ok((await page.locator('#map line.edge').count()) >= 3, 'links between the nodes');
    await axe(page, 'map');
    // A node's connections and addresses.
    await page.locator('#map g.map-node[data-id="router/r-b"]').click();
    await page.getByRole('heading', { name: /^Router r-b/ }).waitFor();
    await shot(page, 'map');

    // r-c killed: it turns red.
    const before = Date.now();
    await routers[1].kill();
    await page.locator('#map g.map-node[data-id="router/r-c"][data-state="down"]').waitFor({ timeout: 20000 });
    t.diagnostic(`r-c drawn down ${Date.now() - before} ms after its kill`);
    assert.equal(await nodes('router', 'up'), 2);
    await shot(page, 'map-router-down');

    // The space page (plan, quotas, sortable list) passes axe-core too.
    await page.getByRole('navigation', { name: 'Pages' }).getByRole('link', { name: 'Address spaces' }).click();
    await page.getByRole('heading', { name: 'Address space default' }).waitFor();
    await page.locator('#quota-bars li').first().waitFor();
    await page.getByRole('button', { name: 'Sort by type' }).click();
    await page.locator('#address-head th[data-sort="type"][aria-sort="ascending"]').waitFor();
    await axe(page, 'address space page');
    await shot(page, 'space');

    // What one live refresh costs the browser (reported, not asserted).
    const cost = await page.evaluate(async () => { const s = performance.now(); await refreshLive(); return performance.now() - s; });
    t.diagnostic(`one live refresh of the space page: ${cost.toFixed(1)} ms`);
    assert.deepEqual(pageErrors, [], 'no errors in the page');
    ok = true;
  } finally {
    if (sender) await sender.stop();
    if (rx) rx.kill();
    if (!ok && page) {
      mkdirSync(SHOTS, { recursive: true });
      await page.screenshot({ path: join(SHOTS, 'overview-failed.png'), fullPage: true }).catch(() => {});
      if (pageErrors.length) console.log(`page errors:\n${pageErrors.join('\n')}`);
    }
    if (browser) await browser.close();
    for (const r of routers) await r.kill();
    await system.stop();
    if (ok) system.remove();
    else console.log(`flotilla log: ${system.logPath}\n${system.tail()}`);
  }
});
