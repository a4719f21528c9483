#!/usr/bin/env python3
"""The console at scale (issues #5 and #15).

    bench/console_scale.py [N] [CONNECTIONS]     (defaults 100000 and 1000)

Starts `flotilla console`, a router and a broker that follow it (release
build; FLOTILLA_BIN to override) on free ports in a temp dir, then:

1. creates N addresses in one address space through the REST API, from
   16 concurrent clients (keep-alive), and reports each 10,000's create
   latency (p50/p99), rate, and the CPU the console, the router and the
   broker used meanwhile: a create must cost the same at 100,000 as at 10;
2. how long after the last create the router accepts a receiver on the
   last address (the time its follower needs to apply them);
3. opens CONNECTIONS AMQP connections to the router (each with a receiver)
   and waits until the console lists them;
4. times list pages (p50/p95 over 100 requests each): the first page, a
   page deep in by `continue`, a filter, and sorted by a stored and by a
   live column; the overview; the page's live numbers; the connections;
5. runs bench/console_browser.mjs (headless Chromium): the overview and
   the address list ready after navigation, and the browser's time per
   second of live refresh on each.

Everything is stopped at the end. Needs python-qpid-proton."""

import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

from proton import Message  # noqa: F401  (python-qpid-proton must be there)
from proton.handlers import MessagingHandler
from proton.reactor import ApplicationEvent, Container, EventInjector
from proton.utils import BlockingConnection

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
CONNECTIONS = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
CREATORS = 16
BIN = os.environ.get("FLOTILLA_BIN", "target/release/flotilla")
HZ = os.sysconf("SC_CLK_TCK")


def start(args, pattern):
    p = subprocess.Popen([BIN] + args, stderr=subprocess.PIPE, text=True)
    found = {}
    ready = threading.Event()

    def read():
        for line in p.stderr:
            m = re.search(pattern, line)
            if m and not ready.is_set():
                found["v"] = m.group(1)
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(20):
        p.kill()
        sys.exit(f"{args[0]} did not start")
    return p, found["v"]


def follow_args(tmp, caddr, token_file):
    """Arguments that make a component follow the console at `caddr`, with
    a mesh secret made in `tmp`."""
    secret = f"{tmp}/mesh-secret"
    with open(secret, "w") as f:
        f.write(os.urandom(24).hex())
    os.chmod(secret, 0o600)
    return ["--console", f"http://{caddr}", "--console-token-file", token_file,
            "--mesh-secret-file", secret]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


class Api:
    """One keep-alive HTTP connection to the console."""

    def __init__(self, addr, token):
        host, port = addr.rsplit(":", 1)
        self.c = http.client.HTTPConnection(host, int(port), timeout=30)
        self.h = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(self, method, path, body=None):
        self.c.request(method, "/api/v1" + path, body=json.dumps(body) if body is not None else None,
                       headers=self.h)
        r = self.c.getresponse()
        data = r.read()
        if r.status >= 300:
            raise RuntimeError(f"{method} {path}: {r.status} {data[:200]!r}")
        return json.loads(data) if data else {}


class Idle(MessagingHandler):
    """CONNECTIONS connections to the router, each with a receiver."""

    def __init__(self, url, n):
        super().__init__()
        self.url, self.n, self.opened = url, n, 0
        self.container = None

    def on_start(self, event):
        self.container = event.container
        self.injector = EventInjector()
        event.container.selectable(self.injector)
        self.started = 0
        self.on_timer_task(event)

    def on_timer_task(self, event):
        # 200 every half second: under the router's 500 new connections
        # per second from one source.
        for _ in range(min(200, self.n - self.started)):
            c = self.container.connect(self.url, virtual_host="scale", reconnect=False)
            self.container.create_receiver(c, f"a{self.started % max(N, 1)}")
            self.started += 1
        if self.started < self.n:
            self.container.schedule(0.5, self)

    def on_link_opened(self, event):
        if event.receiver:
            self.opened += 1

    def on_stop(self, event):
        self.container.stop()


def main():
    tmp = tempfile.mkdtemp()
    procs = []
    try:
        console, caddr = start(
            ["console", "--listen", "127.0.0.1:0", "--data-dir", f"{tmp}/console"],
            r'proto="http" addr=(\S+)')
        procs.append(console)
        token_file = f"{tmp}/console/admin-token"
        token = open(token_file).read().strip()
        follow = follow_args(tmp, caddr, token_file)
        router, raddr = start(["router", "--amqp", "127.0.0.1:0", *follow], r'proto="amqp" addr=(\S+)')
        procs.append(router)
        broker, _ = start(["broker", "--amqp", "127.0.0.1:0", "--data-dir", f"{tmp}/broker",
                           "--router", raddr, *follow], r'proto="amqp" addr=(\S+)')
        procs.append(broker)
        api = Api(caddr, token)
        api.call("POST", "/addressspaces", {"metadata": {"name": "scale"},
                                            "spec": {"authentication": {"anonymous": True}}})

        # 1. Creates, from CREATORS clients; each 10,000 measured apart.
        bucket = 10000 if N >= 20000 else max(1, N // 4)
        next_i = [0]
        lock = threading.Lock()
        lat = [None] * N

        def creator():
            a = Api(caddr, token)
            while True:
                with lock:
                    i = next_i[0]
                    if i >= N:
                        return
                    next_i[0] += 1
                kind = "queue" if i % 10 == 0 else "anycast"
                s = time.monotonic()
                a.call("POST", "/addressspaces/scale/addresses",
                       {"metadata": {"name": f"a{i}"}, "spec": {"address": f"a{i}", "type": kind}})
                lat[i] = time.monotonic() - s

        rows = []
        t0 = time.monotonic()
        threads = [threading.Thread(target=creator, daemon=True) for _ in range(CREATORS)]
        for t in threads:
            t.start()
        done, last_t, last_cpu = 0, t0, [cpu_seconds(p.pid) for p in procs]
        while done < N:
            target = min(N, done + bucket)
            while next_i[0] < target or any(x is None for x in lat[done:target]):
                time.sleep(0.05)
            now = time.monotonic()
            cpu = [cpu_seconds(p.pid) for p in procs]
            part = lat[done:target]
            used = [(c - l) / (now - last_t) for c, l in zip(cpu, last_cpu)]
            rows.append((done, target, pct(part, 0.5), pct(part, 0.99), len(part) / (now - last_t), used))
            print(f"  {target} created, {now - t0:.1f} s", file=sys.stderr)
            done, last_t, last_cpu = target, now, cpu
        for t in threads:
            t.join()
        created = time.monotonic()

        # 2. The router follows.
        last = f"a{N - 1}"
        conn = None
        while True:
            try:
                if conn is None:
                    conn = BlockingConnection(f"amqp://{raddr}", virtual_host="scale", timeout=5)
                conn.create_receiver(last)
                break
            except Exception:
                if time.monotonic() - created > 120:
                    sys.exit("the router did not apply the addresses within 120 s")
                conn = None
                time.sleep(0.01)
        applied = time.monotonic() - created
        conn.close()

        # 3. Connections.
        idle = Idle(f"amqp://{raddr}", CONNECTIONS)
        c = Container(idle)
        reactor = threading.Thread(target=c.run, daemon=True)
        reactor.start()
        deadline = time.monotonic() + 120
        while True:
            listed = len(api.call("GET", "/addressspaces/scale/connections")["items"])
            if listed >= CONNECTIONS:
                break
            if idle.opened >= CONNECTIONS and listed >= CONNECTIONS * 0.99 and time.monotonic() > deadline - 100:
                print(f"  {listed} of {CONNECTIONS} connections listed", file=sys.stderr)
                break
            if time.monotonic() > deadline:
                sys.exit(f"{idle.opened} of {CONNECTIONS} receivers opened, {listed} connections listed")
            time.sleep(0.5)

        # 4. Reads.
        deep = api.call("GET", "/addressspaces/scale/addresses?limit=50&filter=a9")["metadata"].get("continue", "")
        page = api.call("GET", "/addressspaces/scale/addresses?limit=50")["items"]
        visible = ",".join(a["spec"]["address"] for a in page)
        reads = {
            "first page": "/addressspaces/scale/addresses?limit=50",
            "a page deep in (continue)": f"/addressspaces/scale/addresses?limit=50&continue={deep}",
            "filtered": "/addressspaces/scale/addresses?limit=50&filter=a777",
            "sorted by type": "/addressspaces/scale/addresses?limit=50&sort=type&order=desc",
            "sorted by rate (live)": "/addressspaces/scale/addresses?limit=50&sort=rate&order=desc",
            "the page's live numbers": f"/addressspaces/scale/metrics?addresses={visible}",
            "connections (all)": "/addressspaces/scale/connections",
            "overview": "/overview",
        }
        timed = {}
        for what, path in reads.items():
            xs = []
            for _ in range(100):
                s = time.monotonic()
                try:
                    api.call("GET", path)
                except RuntimeError as e:
                    xs = None
                    print(f"  {what}: {e}", file=sys.stderr)
                    break
                xs.append(time.monotonic() - s)
            timed[what] = None if xs is None else (pct(xs, 0.5) * 1000, pct(xs, 0.95) * 1000)

        print(f"\n{N} addresses, {CREATORS} concurrent creators, {CONNECTIONS} connections\n")
        print("| addresses | create p50 | create p99 | creates/s | CPU console / router / broker |")
        print("|---|---:|---:|---:|---|")
        for lo, hi, p50, p99, rate, used in rows:
            cpu = " / ".join(f"{u * 100:.0f}%" for u in used)
            print(f"| {lo:,}–{hi:,} | {p50 * 1000:.2f} ms | {p99 * 1000:.2f} ms | {rate:,.0f} | {cpu} |")
        print(f"\nAll created in {created - t0:.1f} s; the router accepted a receiver on the last "
              f"{applied:.3f} s after its create returned.\n")
        print("| read | p50 | p95 |")
        print("|---|---:|---:|")
        for what, v in timed.items():
            print(f"| {what} | " + ("failed | |" if v is None else f"{v[0]:.1f} ms | {v[1]:.1f} ms |"))
        # The browser's side, with the connections still open.
        browser = None
        if os.path.exists("tests/browser/node_modules/playwright-core"):
            chromium = subprocess.run(["which", "chromium"], capture_output=True, text=True).stdout.strip()
            r = subprocess.run(["node", "bench/console_browser.mjs", f"http://{caddr}/", token, "scale"],
                               capture_output=True, text=True, timeout=180,
                               env=dict(os.environ, CHROMIUM=chromium))
            browser = json.loads(r.stdout) if r.returncode == 0 else r.stderr[-500:]
        print("\nBrowser (headless Chromium, bench/console_browser.mjs):", json.dumps(browser))
        idle.injector.trigger(ApplicationEvent("stop"))
        reactor.join(10)
    finally:
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
