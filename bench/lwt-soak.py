#!/usr/bin/env python3
"""Soak of the last-will service (a benchmark, not a test; not run by CI).

A router, a broker, the last-will service and two MQTT gateways, each its
own process. N clients (raw MQTT 3.1.1, QoS 1 wills on `wills/<id>`) are
spread over the two gateways; a watcher (paho) on the second gateway
subscribes to `wills/#`. The first gateway is killed with SIGKILL. Every
client it held must have its will arrive, once; no client of the second
gateway may have its will arrive (a marker published after the last
expected will must come before any such will).

    python3 bench/lwt-soak.py [--clients 10000] [--bin target/release/flotilla]

Prints the time from the kill to the first and to the last will.
"""

import argparse
import asyncio
import os
import queue
import resource
import signal
import struct
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "interop"))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from mqtt_client import packet, utf8  # noqa: E402

GATEWAY_UP = r"component connected .*gateway=true"


def connect_with_will(client_id):
    vh = utf8(b"MQTT") + bytes([4, 0x02 | 0x04 | (1 << 3)]) + struct.pack(">H", 600)
    return packet(0x10, vh + utf8(client_id) + utf8("wills/" + client_id) + utf8(b"gone " + client_id.encode()))


async def connect_all(port, ids, conns, parallel=200):
    sem = asyncio.Semaphore(parallel)

    async def one(cid):
        async with sem:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(connect_with_will(cid))
            await w.drain()
            ack = await r.readexactly(4)
            if ack[0] != 0x20 or ack[3] != 0:
                raise RuntimeError("%s: CONNACK %r" % (cid, ack))
            conns.append((r, w))

    await asyncio.gather(*(one(c) for c in ids))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--bin", default=None)
    ap.add_argument("--hold", type=int, default=0, help="seconds to keep the processes at the end")
    args = ap.parse_args()
    if args.bin:
        os.environ["FLOTILLA_BIN"] = os.path.abspath(args.bin)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    from conftest import Broker, Gateway, Lwt, Router  # after FLOTILLA_BIN

    d = tempfile.mkdtemp(prefix="flotilla-lwt-soak-")
    procs = []
    try:
        router = Router()
        procs.append(router)
        procs.append(Broker(os.path.join(d, "broker"), "--router", router.url))
        router.wait_for_log(r"broker connected \(route container\)")
        procs.append(Lwt(os.path.join(d, "lwt"), router))
        g1 = Gateway("--router", router.url, "--gateway-id", "gw-1", "--max-connection-rate", "0")
        procs.append(g1)
        g2 = Gateway("--router", router.url, "--gateway-id", "gw-2", "--max-connection-rate", "0")
        procs.append(g2)
        router.wait_for_log(GATEWAY_UP, count=4)

        got = queue.Queue()
        subscribed = threading.Event()
        w = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-watcher")
        w.on_connect = lambda c, u, f, rc, p: c.subscribe("wills/#", 1)
        w.on_subscribe = lambda c, u, m, rc, p: subscribed.set()
        w.on_message = lambda c, u, m: got.put((time.monotonic(), m.topic))
        w.connect("127.0.0.1", g2.port, keepalive=600)
        w.loop_start()
        assert subscribed.wait(20), "watcher not subscribed"

        # Made before the load's sockets: paho's loop uses select(), which
        # takes no descriptor past 1024.
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-marker")
        pub.connect("127.0.0.1", g2.port, keepalive=600)
        pub.loop_start()

        n1 = args.clients // 2
        ids1 = ["c1-%05d" % i for i in range(n1)]
        ids2 = ["c2-%05d" % i for i in range(args.clients - n1)]
        conns = []
        started = time.monotonic()
        loop = asyncio.new_event_loop()
        loop.run_until_complete(connect_all(g1.port, ids1, conns))
        loop.run_until_complete(connect_all(g2.port, ids2, conns))
        print("%d clients with wills connected in %.1f s" % (args.clients, time.monotonic() - started))

        expected = {"wills/" + c for c in ids1}
        killed = time.monotonic()
        os.kill(g1.proc.pid, signal.SIGKILL)
        seen, dup, false, first, last = set(), 0, 0, None, None
        marker_missing = False
        deadline = killed + 120
        while seen != expected and time.monotonic() < deadline:
            try:
                at, topic = got.get(timeout=1)
            except queue.Empty:
                continue
            first = first or at
            if topic in expected:
                dup += topic in seen
                seen.add(topic)
                last = at
            else:
                false += 1
        # Anything of the live gateway's clients would come before this.
        pub.publish("wills/mark", b"mark", qos=1).wait_for_publish(20)
        while True:
            try:
                _, topic = got.get(timeout=20)
            except queue.Empty:
                print("the marker never came")
                marker_missing = True
                print("".join(l for l in list(g2.log)[-20:]))
                break
            if topic == "wills/mark":
                break
            if topic in expected:
                dup += 1
            else:
                false += 1
        print("wills of the killed gateway's %d clients: %d arrived, %d twice; %d wills of live clients"
              % (n1, len(seen), dup, false))
        if first is not None:
            print("kill -> first will %.3f s, kill -> last will %.3f s"
                  % (first - killed, last - killed))
        pub.loop_stop()
        w.loop_stop()
        for _, wr in conns:
            wr.close()
        ok = len(seen) == n1 and dup == 0 and false == 0 and not marker_missing
        if args.hold:
            print("holding: gateway %d, router %s" % (g2.port, router.url), flush=True)
            time.sleep(args.hold)
        print("OK" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    sys.exit(main())
