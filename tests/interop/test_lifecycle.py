"""A router's life in a cluster: `/readyz` only once it serves, `/metrics`
for the autoscaler, and leaving without loss — a router asked to stop
(SIGTERM) goes lame duck: it takes nothing new, lets what is in flight
settle, and sends its clients to a peer. Real processes, python-qpid-proton
clients."""

import signal
import socket
import threading
import time
import urllib.error
import urllib.request

from proton import Message, symbol
from proton.handlers import MessagingHandler
from proton.reactor import Container

from conftest import LISTENING, Console, TIMEOUT, Broker, Gateway, Lwt, Router, connect, wait_until


def http_get(port, path, token=None):
    """(status, body) of GET http://127.0.0.1:port/path (with the bearer
    `token`)."""
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path))
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def free_port():
    """A port nothing listens on now (for a peer that comes later)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def metric(port, line_start):
    """The value of the first /metrics sample starting with `line_start`."""
    _, text = http_get(port, "/metrics")
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_readyz_false_until_the_mesh_is_joined():
    port = free_port()
    a = Router("--router-id", "a", "--inter-router", "127.0.0.1:0", "--peer", "127.0.0.1:%d" % port,
               "--http", "127.0.0.1:0", want=3)
    b = None
    try:
        status, body = http_get(a.ports["http"], "/readyz")
        assert status == 503, body
        assert "mesh" in body, body
        assert http_get(a.ports["http"], "/healthz")[0] == 200
        assert metric(a.ports["http"], 'flotilla_ready{component="router",id="a"}') == 0
        b = Router("--router-id", "b", "--inter-router", "127.0.0.1:%d" % port, "--http", "127.0.0.1:0", want=3)
        # A router with no --peer serves at once.
        assert http_get(b.ports["http"], "/readyz")[0] == 200
        wait_until("a joined the mesh", lambda: http_get(a.ports["http"], "/readyz")[0] == 200)
        assert metric(a.ports["http"], 'flotilla_router_neighbours{router="a"}') == 1
        assert metric(a.ports["http"], 'flotilla_ready{component="router",id="a"}') == 1
        assert metric(a.ports["http"], "process_cpu_seconds_total") is not None
    finally:
        a.stop()
        if b:
            b.stop()


def test_a_router_that_finds_only_itself_behind_its_peer_name_is_ready():
    # A headless service lists every router, this one too; the first of a
    # set finds only itself and must still become ready.
    port = free_port()
    r = Router("--router-id", "solo", "--inter-router", "127.0.0.1:%d" % port, "--peer", "127.0.0.1:%d" % port,
               "--http", "127.0.0.1:0", want=3)
    try:
        wait_until("ready", lambda: http_get(r.ports["http"], "/readyz")[0] == 200)
        assert metric(r.ports["http"], 'flotilla_router_neighbours{router="solo"}') == 0
    finally:
        r.stop()


class Start(MessagingHandler):
    """Starts each flow on its own connections."""

    def __init__(self, flows):
        super().__init__()
        self.flows = flows

    def on_start(self, event):
        for f in self.flows:
            f.start(event.container)


class Flow(MessagingHandler):
    """Senders and receivers of one address on given routers; counts what
    was sent, what came back accepted or released, and what arrived."""

    def __init__(self, address, senders, receivers, count, follows_redirect=False):
        super().__init__(prefetch=100, auto_accept=True)
        self.address, self.senders, self.receivers, self.count = address, senders, receivers, count
        self.sent = 0
        self.accepted, self.released, self.other = set(), set(), set()
        self.received = set()
        self.ready = 0
        self.closed = {}  # url -> (condition name, info) when the router closed the connection
        self.lock = threading.Lock()
        self.sender_conns = []
        # Clients that say they follow amqp:connection:redirect.
        self.caps = [symbol("flotilla:redirect")] if follows_redirect else None

    def start(self, container):
        # Each connection's events come to this handler only.
        for url in self.receivers:
            c = container.connect(url, reconnect=False, handler=self)
            container.create_receiver(c, self.address)
        for url in self.senders:
            c = container.connect(url, reconnect=False, handler=self, desired_capabilities=self.caps)
            self.sender_conns.append(c)
            container.create_sender(c, self.address)

    def on_link_opened(self, event):
        if event.receiver:
            self.ready += 1

    def on_sendable(self, event):
        # Proton lets credit go below zero when the router withdraws it.
        while event.sender.credit > 0 and self.sent < self.count:
            with self.lock:
                n = self.sent
                self.sent += 1
            d = event.sender.send(Message(body=n, durable=False))
            d.seq = n

    def on_accepted(self, event):
        with self.lock:
            self.accepted.add(event.delivery.seq)

    def on_released(self, event):
        with self.lock:
            self.released.add(event.delivery.seq)

    def on_rejected(self, event):
        with self.lock:
            self.other.add(event.delivery.seq)

    def on_message(self, event):
        with self.lock:
            self.received.add(event.message.body)

    def on_connection_remote_close(self, event):
        cond = event.connection.remote_condition
        url = event.connection.connected_address or ""
        self.closed[url] = (cond.name if cond else None, dict(cond.info) if cond and cond.info else {})
        event.connection.close()

    def on_transport_error(self, event):
        pass

    def unsettled(self):
        with self.lock:
            return self.sent - len(self.accepted) - len(self.released) - len(self.other)


def test_a_router_asked_to_stop_loses_nothing_and_sends_its_clients_to_a_peer():
    # Three routers, full mesh. Traffic both ways through router a: a
    # sender on a to receivers on b and c, and a sender on b to receivers
    # on a and c. Then SIGTERM a, under load.
    b = Router("--router-id", "b", "--inter-router", "127.0.0.1:0", "--http", "127.0.0.1:0", want=3)
    a = c = None
    try:
        ir_b = "127.0.0.1:%d" % b.ports["inter-router"]
        # a sends its clients to b when it stops.
        a = Router("--router-id", "a", "--inter-router", "127.0.0.1:0", "--peer", ir_b, "--http", "127.0.0.1:0",
                   "--drain-timeout", "15", "--redirect", b.url, want=3)
        ir_a = "127.0.0.1:%d" % a.ports["inter-router"]
        c = Router("--router-id", "c", "--peer", ir_a, "--peer", ir_b, "--http", "127.0.0.1:0", want=2)
        for r, rid in ((a, "a"), (b, "b"), (c, "c")):
            wait_until("%s sees two neighbours" % rid,
                       lambda: metric(r.ports["http"], 'flotilla_router_neighbours{router="%s"}' % rid) == 2)
        out = Flow("out-of-a", [a.url], [b.url, c.url], 200_000, follows_redirect=True)
        into = Flow("into-a", [b.url], [a.url, c.url], 200_000)
        flows = [out, into]
        container = Container(Start(flows))
        runner = threading.Thread(target=container.run, daemon=True)
        runner.start()
        wait_until("traffic flows both ways", lambda: len(out.accepted) > 2000 and len(into.accepted) > 2000)
        a.proc.send_signal(signal.SIGTERM)
        code = a.proc.wait(timeout=30)
        assert code == 0, "".join(a.log)
        # The sender on a was closed with a redirect to b, after every
        # message it sent had its outcome.
        wait_until("a's client hears why", lambda: len(out.closed) >= 1)
        conds = [v for k, v in out.closed.items()]
        assert ("amqp:connection:redirect" in [cnd for cnd, _ in conds]), out.closed
        info = [i for cnd, i in conds if cnd == "amqp:connection:redirect"][0]
        assert int(info.get("port")) == b.ports["amqp"], info
        assert out.unsettled() == 0, (out.sent, len(out.accepted), len(out.released))
        # A client that did not say it follows a redirect hears "forced"
        # (proton then reconnects by itself).
        wait_until("a's receiver hears why", lambda: len(into.closed) >= 1)
        assert [cnd for cnd, _ in into.closed.values()] == ["amqp:connection:forced"], into.closed
        # The flow into a goes on to c; let what is in flight settle.
        sent_at_stop = into.sent
        wait_until("the flow into a's address goes on without a",
                   lambda: len(into.accepted) > sent_at_stop + 1000 or into.sent >= into.count)
        into.count = into.sent  # no more
        wait_until("every message into a settled", lambda: into.unsettled() == 0)
        for f in flows:
            lost = f.accepted - f.received
            assert not lost, "%d accepted messages never arrived on %s" % (len(lost), f.address)
        assert "lame duck: every delivery settled" in "".join(a.log), "".join(a.log)
    finally:
        for r in (a, b, c):
            if r:
                r.stop()


class Reconnecting(Flow):
    """A flow whose clients reconnect through the routers' list, as
    proton's failover does, when a router closes them."""

    def __init__(self, address, senders, receivers, count, urls):
        super().__init__(address, senders, receivers, count)
        self.urls = urls

    def start(self, container):
        for url in self.receivers:
            c = container.connect(urls=self.rotated(url), handler=self)
            container.create_receiver(c, self.address)
        for url in self.senders:
            c = container.connect(urls=self.rotated(url), handler=self)
            container.create_sender(c, self.address)

    def rotated(self, first):
        i = self.urls.index(first)
        return self.urls[i:] + self.urls[:i]

    def on_connection_remote_close(self, event):
        # Proton reconnects after amqp:connection:forced by itself.
        cond = event.connection.remote_condition
        self.closed.setdefault(cond.name if cond else None, 0)
        self.closed[cond.name if cond else None] += 1


def test_rolling_restart_of_three_routers_under_load_loses_nothing():
    ports = {r: (free_port(), free_port()) for r in "abc"}
    peers = {"a": [], "b": ["a"], "c": ["a", "b"]}

    def start(name):
        amqp, ir = ports[name]
        args = ["--router-id", name, "--inter-router", "127.0.0.1:%d" % ir, "--http", "127.0.0.1:0",
                "--drain-timeout", "15"]
        for p in peers[name]:
            args += ["--peer", "127.0.0.1:%d" % ports[p][1]]
        return Router(*args, amqp="127.0.0.1:%d" % amqp, want=3)

    def meshed():
        for name, r in routers.items():
            wait_until("%s sees two neighbours" % name,
                       lambda: metric(r.ports["http"], 'flotilla_router_neighbours{router="%s"}' % name) == 2)

    routers = {}
    try:
        for name in "abc":
            routers[name] = start(name)
        meshed()
        urls = [routers[n].url for n in "abc"]
        flow = Reconnecting("roll", [urls[0], urls[2]], urls, 10_000_000, urls)
        container = Container(Start([flow]))
        threading.Thread(target=container.run, daemon=True).start()
        wait_until("traffic flows", lambda: len(flow.accepted) > 2000)
        for name in "abc":
            before = len(flow.accepted)
            r = routers[name]
            r.proc.send_signal(signal.SIGTERM)
            assert r.proc.wait(timeout=30) == 0, "".join(r.log)
            # Its last lines may still be on their way through the pipe.
            r.wait_for_log("lame duck: every delivery settled")
            routers[name] = start(name)
            meshed()
            wait_until("traffic flows after %s restarted" % name, lambda: len(flow.accepted) > before + 2000)
        flow.count = flow.sent  # no more
        wait_until("every message settled", lambda: flow.unsettled() == 0)
        lost = flow.accepted - flow.received
        assert not lost, "%d accepted messages never arrived" % len(lost)
        assert flow.closed.get("amqp:connection:forced", 0) >= 3, flow.closed
    finally:
        for r in routers.values():
            r.stop()


SCALE_CONFIG = """
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: on-b0}
spec: {address: on-b0, type: queue, broker: broker-0}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: on-b1}
spec: {address: on-b1, type: queue, broker: broker-1}
"""


def test_a_broker_scaled_away_keeps_its_messages_for_its_return(config_file, tmpdir_path):
    # On Kubernetes a broker is a StatefulSet of one whose volume is
    # retained when it is scaled away (persistentVolumeClaimRetentionPolicy
    # Retain): scaled back, broker-1 starts on the same journal with the
    # same id, and the queues placed on it have every message they held.
    # Meanwhile the other broker's queues serve on.
    import os
    cfg = config_file(SCALE_CONFIG)
    r = Router("--config", cfg)
    brokers = {}
    try:
        for name in ("broker-0", "broker-1"):
            brokers[name] = Broker(os.path.join(tmpdir_path, name), "--config", cfg, "--router", r.url,
                                   "--container-id", name)
        r.wait_for_log(r"broker connected \(route container\)", count=2)
        c = connect(r.url)
        s1 = c.create_sender("on-b1")
        for i in range(100):
            s1.send(Message(body="kept %d" % i, durable=True))
        c.close()
        # Scaled away: asked to stop, as Kubernetes does.
        b1 = brokers.pop("broker-1")
        b1.proc.send_signal(signal.SIGTERM)
        assert b1.proc.wait(timeout=30) == 0
        # The other broker's queue serves on.
        c = connect(r.url)
        c.create_sender("on-b0").send(Message(body="still here"))
        rcv = c.create_receiver("on-b0", credit=1)
        assert rcv.receive(timeout=TIMEOUT).body == "still here"
        rcv.accept()
        c.close()
        # Scaled back: the same id on the same volume.
        brokers["broker-1"] = Broker(os.path.join(tmpdir_path, "broker-1"), "--config", cfg, "--router", r.url,
                                     "--container-id", "broker-1")
        r.wait_for_log(r"broker connected \(route container\)", count=3)
        c = connect(r.url)
        rcv = c.create_receiver("on-b1", credit=100)
        got = []
        for _ in range(100):
            got.append(rcv.receive(timeout=TIMEOUT).body)
            rcv.accept()
        assert got == ["kept %d" % i for i in range(100)]
        c.close()
    finally:
        r.stop()
        for b in brokers.values():
            b.stop()


def test_every_component_serves_metrics_and_is_ready_only_while_it_serves(tmpdir_path, config_file):
    # Each component's --http: /healthz, /readyz true only while it
    # serves (its router connected), /metrics with its own series.
    import os
    import paho.mqtt.client as mqtt
    cfg = config_file("""
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: stock}
spec: {address: stock, type: queue}
""")
    r = Router("--router-id", "r0", "--http", "127.0.0.1:0", "--config", cfg)
    procs = [r]
    try:
        b = Broker(os.path.join(tmpdir_path, "b"), "--router", r.url, "--container-id", "b0", "--http", "127.0.0.1:0",
                   "--config", cfg)
        procs.append(b)
        g = Gateway("--router", r.url, "--gateway-id", "g0", "--http", "127.0.0.1:0")
        procs.append(g)
        lwt = Lwt(os.path.join(tmpdir_path, "lwt"), r, "--lwt-id", "l0", "--http", "127.0.0.1:0")
        procs.append(lwt)
        lwt_port = wait_until("the service's http port", lambda: next(
            (int(m.group(3)) for m in map(LISTENING.search, list(lwt.log)) if m and m.group(1) == "http"), None))
        ports = {"broker": b.ports["http"], "gateway": g.ports["http"], "lwt": lwt_port, "router": r.ports["http"]}
        for what, port in ports.items():
            wait_until(what + " ready", lambda: http_get(port, "/readyz")[0] == 200)
            assert http_get(port, "/healthz")[0] == 200
        # Something to count: a stored message, an MQTT client.
        c = connect(r.url)
        r.wait_for_log(r'broker connected \(route container\).*broker="?b0')
        c.create_sender("stock").send(Message(body="one", durable=True))
        c.close()
        m = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="meter")
        m.connect("127.0.0.1", g.port)
        m.loop_start()
        try:
            wait_until("the broker counts the message",
                       lambda: metric(ports["broker"], 'flotilla_queue_depth{broker="b0",space="default",queue="stock"}') == 1)
            wait_until("the gateway counts its client",
                       lambda: metric(ports["gateway"], 'flotilla_mqtt_connections{gateway="g0",space="default"}') == 1)
        finally:
            m.loop_stop()
            m.disconnect()
        assert metric(ports["router"], 'flotilla_router_client_connections{router="r0"}') is not None
        assert metric(ports["lwt"], 'flotilla_ready{component="lwt",id="l0"}') == 1
        # Their router gone, the components are alive but not ready.
        r.stop()
        for what in ("broker", "gateway", "lwt"):
            status, body = wait_until(what + " not ready", lambda: (lambda s: s if s[0] == 503 else None)(http_get(ports[what], "/readyz")))
            assert "router" in body, body
            assert http_get(ports[what], "/healthz")[0] == 200
    finally:
        for p in procs:
            p.stop()


def test_metrics_off_loopback_need_the_admin_token(tmpdir_path):
    # /metrics names every tenant's addresses: a stranger reaching a
    # component's --http off loopback gets probes, not the series.
    import os
    alone = Router("--router-id", "alone", "--http", "0.0.0.0:0")
    console = Console(os.path.join(tmpdir_path, "console"))
    follower = Router("--router-id", "follows", "--http", "0.0.0.0:0", *console.follow_args())
    try:
        for r in (alone, follower):
            assert http_get(r.ports["http"], "/healthz")[0] == 200
            assert http_get(r.ports["http"], "/readyz")[0] == 200
        status, body = http_get(alone.ports["http"], "/metrics")
        assert status == 403 and "FLOTILLA_ADMIN_TOKEN" in body, (status, body)
        assert http_get(follower.ports["http"], "/metrics")[0] == 401
        assert http_get(follower.ports["http"], "/metrics", token="not-the-token")[0] == 401
        status, body = http_get(follower.ports["http"], "/metrics", token=console.token)
        assert status == 200 and 'flotilla_router_client_connections{router="follows"}' in body, body
    finally:
        for p in (alone, follower, console):
            p.stop()
