#!/usr/bin/env python3
"""Console at scale (issue #5): create N addresses through the REST API one
after the other, measure each create's latency (p50/p99), then how long
after the last create a router following the console accepts a receiver
on the last address (the time to apply them all).

    bench/console_scale.py [N]        (default 10000)

Starts `flotilla console` and `flotilla router --console` (release build,
FLOTILLA_BIN to override) on free ports in a temp dir; everything is
stopped at the end. Needs python-qpid-proton for the router check."""

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from proton.utils import BlockingConnection

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
BIN = os.environ.get("FLOTILLA_BIN", "target/release/flotilla")


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
    if not ready.wait(15):
        p.kill()
        sys.exit(f"{args[0]} did not start")
    return p, found["v"]


def main():
    tmp = tempfile.mkdtemp()
    procs = []
    try:
        console, caddr = start(
            ["console", "--listen", "127.0.0.1:0", "--data-dir", f"{tmp}/console"],
            r'proto="http" addr=(\S+)')
        procs.append(console)
        token = open(f"{tmp}/console/admin-token").read().strip()
        router, raddr = start(
            ["router", "--amqp", "127.0.0.1:0", "--console", f"http://{caddr}",
             "--console-token-file", f"{tmp}/console/admin-token"],
            r'proto="amqp" addr=(\S+)')
        procs.append(router)

        def call(method, path, body=None):
            req = urllib.request.Request(
                f"http://{caddr}/api/v1{path}", method=method,
                data=json.dumps(body).encode() if body is not None else None,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            with urllib.request.urlopen(req) as r:
                return json.loads(r.read())

        call("POST", "/addressspaces", {"metadata": {"name": "scale"},
                                        "spec": {"authentication": {"anonymous": True}}})
        lat = []
        t0 = time.monotonic()
        for i in range(N):
            s = time.monotonic()
            call("POST", "/addressspaces/scale/addresses",
                 {"metadata": {"name": f"a{i}"}, "spec": {"address": f"a{i}", "type": "anycast"}})
            lat.append(time.monotonic() - s)
            if (i + 1) % 1000 == 0:
                print(f"  {i + 1} created, {time.monotonic() - t0:.1f} s", file=sys.stderr)
        created = time.monotonic()
        last = f"a{N - 1}"
        conn = None
        while True:
            try:
                if conn is None:
                    conn = BlockingConnection(f"amqp://{raddr}", virtual_host="scale", timeout=5)
                conn.create_receiver(last)
                break
            except Exception:
                if time.monotonic() - created > 60:
                    sys.exit("the router did not apply the addresses within 60 s")
                conn = None
                time.sleep(0.01)
        applied = time.monotonic() - created
        conn.close()
        lat.sort()
        listed = call("GET", "/addressspaces/scale/addresses?limit=1")
        print(json.dumps({
            "addresses": N,
            "create_p50_ms": round(lat[len(lat) // 2] * 1000, 2),
            "create_p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2),
            "create_total_s": round(created - t0, 2),
            "router_applied_last_after_s": round(applied, 3),
            "resource_version": listed["metadata"]["resourceVersion"],
        }))
    finally:
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
