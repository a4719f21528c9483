// Starts the real system with `flotilla up` (console + router + broker) on
// 127.0.0.1 port 0, reads the bound ports from the `listening` log lines,
// and stops the whole process group.
import { spawn } from 'node:child_process';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, createWriteStream, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join, dirname, delimiter } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';

export const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
/** Where the tests leave their screenshots. */
export const SHOTS = join(root, 'target', 'browser-screenshots');
const AXE = createRequire(import.meta.url).resolve('axe-core/axe.min.js');

/** axe-core on the page as it is: no serious or critical violations. */
export async function axe(page, what) {
  if (!(await page.evaluate(() => typeof window.axe !== 'undefined'))) await page.addScriptTag({ path: AXE });
  const v = await page.evaluate(async () => {
    const r = await window.axe.run(document, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] } });
    return r.violations.filter((x) => x.impact === 'serious' || x.impact === 'critical')
      .map((x) => `${x.id} (${x.impact}): ${x.nodes.slice(0, 3).map((n) => n.target.join(' ')).join(', ')}`);
  });
  assert.deepEqual(v, [], `axe-core on the ${what}`);
}

/** Creates address `name` (its address too) of `type` through the space
 * page's form; resolves with its row once the table shows it. */
export async function createAddress(page, name, type) {
  const form = page.locator('#address-form');
  await form.getByLabel('Name', { exact: true }).fill(name);
  await form.getByLabel('Address', { exact: true }).fill(name);
  await form.getByLabel('Type', { exact: true }).selectOption(type);
  await form.getByRole('button', { name: 'Create' }).click();
  const row = page.locator(`#address-rows tr[data-address="${name}"]`);
  await row.waitFor();
  return row;
}

/** A full-page screenshot in SHOTS, named `name`. */
export async function shot(page, name) {
  mkdirSync(SHOTS, { recursive: true });
  const path = join(SHOTS, `${name}.png`);
  await page.screenshot({ path, fullPage: true });
  console.log(`screenshot: ${path}`);
}

/** The flotilla binary: $FLOTILLA_BIN, else the debug build, else release. */
export function binary() {
  if (process.env.FLOTILLA_BIN) return process.env.FLOTILLA_BIN;
  for (const p of ['debug', 'release']) {
    const b = join(root, 'target', p, 'flotilla');
    if (existsSync(b)) return b;
  }
  throw new Error('build flotilla first (cargo build) or set FLOTILLA_BIN');
}

/** Debian's Chromium (`which chromium`), or $CHROMIUM. */
export function chromiumPath() {
  if (process.env.CHROMIUM) return process.env.CHROMIUM;
  for (const dir of (process.env.PATH || '').split(delimiter)) {
    const p = join(dir, 'chromium');
    if (dir && existsSync(p)) return p;
  }
  throw new Error('no chromium on PATH: apt-get install chromium');
}

const LISTENING = {
  console: /flotilla_console: listening proto="http" addr=[\d.]+:(\d+)/,
  router: /flotilla_router: listening proto="amqp" addr=[\d.]+:(\d+)/,
  interRouter: /flotilla_router: listening proto="inter-router" addr=[\d.]+:(\d+)/,
};

/**
 * Runs `flotilla ARGS` in its own process group with its log in
 * DIR/flotilla.log. Resolves once `ready(ports)` holds for the ports read
 * from its `listening` lines (within `ms`); `tail()` gives the log's end,
 * `stop()` ends the whole group.
 */
async function launch(what, args, dir, ready, ms) {
  const logPath = join(dir, 'flotilla.log');
  const log = createWriteStream(logPath);
  const last = [];
  const proc = spawn(binary(), args, {
    // Its own process group, so stop() ends everything it started.
    detached: true,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, RUST_LOG: 'info', NO_COLOR: '1' },
  });
  let exited = null;
  const exit = new Promise((resolve) => proc.once('exit', (code, signal) => { exited = { code, signal }; resolve(); }));
  // A last resort if the test process dies before stop(): never leave it running.
  const onExit = () => { try { process.kill(-proc.pid, 'SIGKILL'); } catch { /* gone */ } };
  process.once('exit', onExit);

  const ports = {};
  const listening = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${what} did not report listening within ${ms} ms`)), ms);
    proc.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`${what} exited (code ${code}, signal ${signal}) before listening`));
    });
    const onLine = (line) => {
      // Keep draining both pipes for the whole run, or the process blocks on a full pipe.
      log.write(line + '\n');
      last.push(line);
      if (last.length > 40) last.shift();
      for (const [k, re] of Object.entries(LISTENING)) {
        const m = re.exec(line.replace(/\x1b\[[0-9;]*m/g, ''));
        if (m && ports[k] === undefined) ports[k] = Number(m[1]);
      }
      if (ready(ports)) { clearTimeout(timer); resolve(); }
    };
    createInterface({ input: proc.stderr }).on('line', onLine);
    createInterface({ input: proc.stdout }).on('line', onLine);
  });

  const stop = async () => {
    process.removeListener('exit', onExit);
    if (exited === null) {
      try { process.kill(-proc.pid, 'SIGTERM'); } catch { /* gone */ }
      const killer = setTimeout(() => { try { process.kill(-proc.pid, 'SIGKILL'); } catch { /* gone */ } }, 5000);
      await exit;
      clearTimeout(killer);
    }
    // Anything else left in the group (there should be nothing).
    try { process.kill(-proc.pid, 'SIGKILL'); } catch { /* gone */ }
    await new Promise((r) => log.end(r));
  };

  try {
    await listening;
  } catch (e) {
    await stop();
    e.message += `\n--- ${logPath} (end) ---\n${last.join('\n')}`;
    throw e;
  }
  return { ports, logPath, tail: () => last.join('\n'), stop };
}

/**
 * Runs `flotilla up` in a fresh temporary directory. Resolves once the
 * console and the router listen (within `ms`), with their ports and the
 * admin token. The log goes to DIR/flotilla.log; `tail()` gives its end.
 */
export async function startSystem(ms = 20000, extra = []) {
  const dir = mkdtempSync(join(tmpdir(), 'flotilla-browser-'));
  const { ports, logPath, tail, stop } = await launch('flotilla up', [
    'up',
    '--amqp', '127.0.0.1:0',
    '--broker-amqp', '127.0.0.1:0',
    '--http', '127.0.0.1:0',
    '--data-dir', dir,
    ...extra,
  ], dir, (p) => p.console !== undefined && p.router !== undefined &&
    (!extra.includes('--inter-router') || p.interRouter !== undefined), ms);
  const token = readFileSync(join(dir, 'console', 'admin-token'), 'utf8').trim();
  return {
    dir,
    logPath,
    consolePort: ports.console,
    routerPort: ports.router,
    interRouterPort: ports.interRouter,
    token,
    tail,
    stop,
    remove: () => rmSync(dir, { recursive: true, force: true }),
  };
}

/**
 * Runs the console alone (`flotilla console`, no router or broker) with
 * `extra` flags, its store in a fresh temporary directory. Resolves once it
 * listens, with its port and the admin token it made in DIR/admin-token.
 */
export async function startConsole(extra = [], ms = 20000) {
  const dir = mkdtempSync(join(tmpdir(), 'flotilla-browser-'));
  const { ports, logPath, tail, stop } = await launch('flotilla console', [
    'console',
    '--http', '127.0.0.1:0',
    '--data-dir', dir,
    ...extra,
  ], dir, (p) => p.console !== undefined, ms);
  const token = readFileSync(join(dir, 'admin-token'), 'utf8').trim();
  return {
    dir,
    logPath,
    consolePort: ports.console,
    token,
    tail,
    stop,
    remove: () => rmSync(dir, { recursive: true, force: true }),
  };
}

/**
 * Starts one more router (`flotilla router`) that joins the mesh of
 * `system` (started with `--inter-router`) and follows its console.
 * Resolves once it listens; `kill()` ends it with SIGKILL.
 */
export async function startRouter(system, id, ms = 20000) {
  const proc = spawn(binary(), [
    'router',
    '--amqp', '127.0.0.1:0',
    '--inter-router', '127.0.0.1:0',
    '--router-id', id,
    '--peer', `127.0.0.1:${system.interRouterPort}`,
    '--console', `http://127.0.0.1:${system.consolePort}`,
    '--console-token-file', join(system.dir, 'console', 'admin-token'),
    '--mesh-secret-file', join(system.dir, 'mesh-secret'),
  ], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, RUST_LOG: 'info', NO_COLOR: '1' } });
  const onExit = () => { try { proc.kill('SIGKILL'); } catch { /* gone */ } };
  process.once('exit', onExit);
  const exit = new Promise((resolve) => proc.once('exit', resolve));
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`router ${id} did not listen within ${ms} ms`)), ms);
    createInterface({ input: proc.stderr }).on('line', (line) => {
      if (/listening proto="amqp"/.test(line)) { clearTimeout(timer); resolve(); }
    });
    proc.once('exit', (code) => { clearTimeout(timer); reject(new Error(`router ${id} exited (${code})`)); });
  });
  return {
    kill: async () => {
      process.removeListener('exit', onExit);
      try { proc.kill('SIGKILL'); } catch { /* gone */ }
      await exit;
    },
  };
}
