// Starts the real system with `flotilla up` (console + router + broker) on
// 127.0.0.1 port 0, reads the bound ports from the `listening` log lines,
// and stops the whole process group.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, createWriteStream, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname, delimiter } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';

export const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

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
 * Runs `flotilla up` in a fresh temporary directory. Resolves once the
 * console and the router listen (within `ms`), with their ports and the
 * admin token. The log goes to DIR/flotilla.log; `tail()` gives its end.
 */
export async function startSystem(ms = 20000, extra = []) {
  const dir = mkdtempSync(join(tmpdir(), 'flotilla-browser-'));
  const logPath = join(dir, 'flotilla.log');
  const log = createWriteStream(logPath);
  const last = [];
  const proc = spawn(binary(), [
    'up',
    '--amqp', '127.0.0.1:0',
    '--broker-amqp', '127.0.0.1:0',
    '--http', '127.0.0.1:0',
    '--data-dir', dir,
    ...extra,
  ], {
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
  const ready = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`flotilla up did not report listening within ${ms} ms`)), ms);
    proc.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`flotilla up exited (code ${code}, signal ${signal}) before listening`));
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
      const want = extra.includes('--inter-router') ? ports.interRouter !== undefined : true;
      if (ports.console !== undefined && ports.router !== undefined && want) { clearTimeout(timer); resolve(); }
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
    await ready;
  } catch (e) {
    await stop();
    e.message += `\n--- ${logPath} (end) ---\n${last.join('\n')}`;
    throw e;
  }
  const token = readFileSync(join(dir, 'console', 'admin-token'), 'utf8').trim();
  return {
    dir,
    logPath,
    consolePort: ports.console,
    routerPort: ports.router,
    interRouterPort: ports.interRouter,
    token,
    tail: () => last.join('\n'),
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
