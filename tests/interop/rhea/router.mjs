// Starts the real `flotilla` binary on 127.0.0.1 port 0 and reads the bound
// port from its `listening` log line.
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

function binary() {
  if (process.env.FLOTILLA_BIN) return process.env.FLOTILLA_BIN;
  for (const p of ['release', 'debug']) {
    const b = join(root, 'target', p, 'flotilla');
    if (existsSync(b)) return b;
  }
  throw new Error('build flotilla first or set FLOTILLA_BIN');
}

export async function startRouter(...args) {
  const proc = spawn(binary(), ['router', '--amqp', '127.0.0.1:0', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  const lines = createInterface({ input: proc.stderr });
  const port = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('router did not report listening')), 20000);
    lines.on('line', (l) => {
      const m = /listening proto="amqp" addr=[\d.]+:(\d+)/.exec(l);
      if (m) { clearTimeout(timer); resolve(Number(m[1])); }
    });
    proc.on('exit', (code) => { clearTimeout(timer); reject(new Error(`router exited with ${code}`)); });
  });
  const exited = new Promise((r) => proc.once('exit', (code) => r(code)));
  return {
    port,
    // Asks it to stop (SIGTERM) and resolves with its exit code.
    term: () => { proc.kill('SIGTERM'); return exited; },
    stop: () => { if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL'); return exited; },
  };
}
