#!/usr/bin/env python3
"""A router asked to stop under load (a benchmark, not a test; not run by CI).

Three routers, full mesh, each its own process; python-qpid-proton
clients send both ways through router a (a sender on a to receivers on b
and c; a sender on b to receivers on a and c). Once 20,000 messages of
each flow were accepted, a gets SIGTERM. Prints, per run: the deliveries
in flight at the signal, the seconds from the signal to "every delivery
settled" (lame duck, including its 200 + 50 ms of quiet), deliveries its
sender was left without an outcome for, and accepted messages that never
arrived.

    FLOTILLA_BIN=target/release/flotilla python3 bench/lame-duck.py [RUNS]
"""

import os
import re
import signal
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "interop"))

from proton.reactor import Container  # noqa: E402

import test_lifecycle as t  # noqa: E402
from conftest import Router  # noqa: E402


def seconds(m):
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))


def run():
    b = Router("--router-id", "b", "--inter-router", "127.0.0.1:0", "--http", "127.0.0.1:0", want=3)
    ir_b = "127.0.0.1:%d" % b.ports["inter-router"]
    a = Router("--router-id", "a", "--inter-router", "127.0.0.1:0", "--peer", ir_b, "--http", "127.0.0.1:0",
               "--redirect", b.url, want=3)
    ir_a = "127.0.0.1:%d" % a.ports["inter-router"]
    c = Router("--router-id", "c", "--peer", ir_a, "--peer", ir_b, "--http", "127.0.0.1:0", want=2)
    try:
        for r, rid in ((a, "a"), (b, "b"), (c, "c")):
            t.wait_until("the mesh", lambda: t.metric(r.ports["http"], 'flotilla_router_neighbours{router="%s"}' % rid) == 2)
        out = t.Flow("out-of-a", [a.url], [b.url, c.url], 10_000_000, follows_redirect=True)
        into = t.Flow("into-a", [b.url], [a.url, c.url], 10_000_000)
        threading.Thread(target=Container(t.Start([out, into])).run, daemon=True).start()
        t.wait_until("traffic", lambda: len(out.accepted) > 20000 and len(into.accepted) > 20000)
        a.proc.send_signal(signal.SIGTERM)
        a.proc.wait(timeout=30)
        log = "".join(a.log)
        at = lambda what: re.search(r"(\d\d):(\d\d):(\d\d\.\d+)Z[^\n]*" + what, log)
        t.wait_until("a's sender hears why", lambda: len(out.closed) >= 1)
        return (int(re.search(r"in_flight=(\d+)", log).group(1)),
                round(seconds(at("every delivery settled")) - seconds(at("lame duck: accepting")), 3),
                out.unsettled(), len(out.accepted - out.received))
    finally:
        for r in (a, b, c):
            r.stop()


if __name__ == "__main__":
    print("| run | in flight at SIGTERM | s to all settled | unsettled at close | accepted, not arrived |")
    print("|---|---|---|---|---|")
    for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
        print("| %d | %d | %.3f | %d | %d |" % ((i + 1,) + run()), flush=True)
    os._exit(0)
