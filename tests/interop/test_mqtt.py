"""The MQTT gateway with clients no one here wrote: paho-mqtt 2.x (3.1.1 and
5.0), mosquitto_pub/mosquitto_sub, and python-qpid-proton on the AMQP side.

Each test runs a router, a broker behind it and a gateway in front of it,
as separate processes on 127.0.0.1 port 0. "Not delivered" is shown by
order, never by waiting: a marker published after what must not arrive
has to come first."""

import os
import queue
import shutil
import socket
import subprocess
import time

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from proton import ConnectionException, Message, symbol
from proton.reactor import AtMostOnce, ReceiverOption
from proton.utils import LinkDetached, SendException

from conftest import TIMEOUT, Broker, Gateway, Lwt, Router, connect, followers, make_certs
from mqtt_client import Client, Raw, Refused, connect_packet, packet, publish_packet, utf8, varint

BROKER_UP = r"broker connected \(route container\)"
GATEWAY_UP = r"component connected .*gateway=true"

IOT = """
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: iot}
spec: {authentication: {anonymous: false}}
---
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: other}
spec: {authentication: {anonymous: false}}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: sensors}
spec: {addressSpace: iot, address: "sensors/#", type: topic}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: sensors}
spec: {addressSpace: other, address: "sensors/#", type: topic}
---
apiVersion: flotilla.dev/v1
kind: MessagingUser
metadata: {name: dev}
spec:
  addressSpace: iot
  username: dev
  password: dev-pw
  authorization: [{addresses: ["#"], operations: [send, recv]}]
---
apiVersion: flotilla.dev/v1
kind: MessagingUser
metadata: {name: reader}
spec:
  addressSpace: iot
  username: reader
  password: reader-pw
  authorization: [{addresses: ["sensors/#"], operations: [recv]}]
---
apiVersion: flotilla.dev/v1
kind: MessagingUser
metadata: {name: dev}
spec:
  addressSpace: other
  username: dev
  password: other-pw
  authorization: [{addresses: ["#"], operations: [send, recv]}]
"""


class Stack:
    """A router, a broker, the last-will service and an MQTT gateway (each
    its own process)."""

    def __init__(self, data_dir, config=None, gateway_args=(), lwt=True):
        cfg = []
        if config is not None:
            path = os.path.join(data_dir, "config.yaml")
            with open(path, "w") as f:
                f.write(config)
            cfg = ["--config", path]
        self.data_dir = data_dir
        self.procs = []
        self.router = self._keep(Router(*cfg))
        self.broker = self._keep(Broker(os.path.join(data_dir, "broker"), *cfg, "--router", self.router.url))
        self.router.wait_for_log(BROKER_UP)
        self.lwt = self._keep(Lwt(os.path.join(data_dir, "lwt"), self.router, *cfg)) if lwt else None
        self.gateway = self._keep(Gateway(*cfg, "--router", self.router.url, *gateway_args))
        self.router.wait_for_log(GATEWAY_UP, count=2)
        self.cfg = cfg

    def another_gateway(self):
        """A second gateway replica on the same router."""
        n = sum(1 for l in list(self.router.log) if "gateway=true" in l)
        g = self._keep(Gateway(*self.cfg, "--router", self.router.url, "--gateway-id", "replica-2"))
        self.router.wait_for_log(GATEWAY_UP, count=n + 2)
        return g

    def _keep(self, p):
        self.procs.append(p)
        return p

    @property
    def port(self):
        return self.gateway.port

    def restart_gateway(self):
        n = sum(1 for l in list(self.router.log) if "gateway=true" in l)
        self.gateway.restart()
        self.router.wait_for_log(GATEWAY_UP, count=n + 2)

    def restart_broker(self):
        n = sum(1 for l in list(self.router.log) if "broker connected (route container)" in l)
        self.broker.restart()
        self.router.wait_for_log(BROKER_UP, count=n + 1)

    def stop(self):
        for p in self.procs:
            p.stop()


@pytest.fixture
def stack(tmpdir_path):
    made = []

    def start(config=None, gateway_args=(), lwt=True):
        s = Stack(tmpdir_path, config, gateway_args, lwt)
        made.append(s)
        return s

    yield start
    for s in made:
        s.stop()


@pytest.fixture
def clients():
    """`clients(port, **kw)`: paho clients, all closed afterwards."""
    made = []

    def new(port, **kw):
        c = Client(port, **kw)
        made.append(c)
        return c

    yield new
    for c in made:
        c.close()


def persistent(client_id, v5, expiry):
    """The client options of a persistent session: a 3.1.1 clean-session
    flag of false, or a 5.0 session expiry."""
    kw = {"v5": v5, "client_id": client_id, "clean": False}
    if v5:
        kw["expiry"] = expiry
    return kw


def away_with_messages(clients, port, kw, topic_filter, topic, bodies):
    """A new persistent session subscribes to `topic_filter` at QoS 1 and
    disconnects; then `bodies` are published to `topic` at QoS 1 by
    another client, which is returned."""
    c = clients(port, **kw)
    assert c.session_present is False
    assert c.subscribe(topic_filter, 1) == [1]
    c.disconnect()
    pub = clients(port, v5=kw["v5"])
    for b in bodies:
        pub.publish(topic, b, qos=1)
    return pub


def mosquitto(tool, port, *args, timeout=TIMEOUT):
    return subprocess.run([tool, "-h", "127.0.0.1", "-p", str(port), *args],
                          capture_output=True, text=True, timeout=timeout)


# ---- zero-config with mosquitto's own clients ----

def test_mosquitto_pub_and_sub_just_work_at_each_qos(stack):
    s = stack()
    # stdbuf: mosquitto_sub's output line by line through the pipe.
    sub = subprocess.Popen(["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(s.port), "-t", "sensors/#",
                            "-q", "2", "-v", "-C", "4", "-W", str(TIMEOUT), "-i", "watcher", "-d"],
                           stdout=subprocess.PIPE, text=True)
    # -d prints "received SUBACK" once subscribed: publish only then.
    for line in sub.stdout:
        if "received SUBACK" in line:
            break
    for q in (0, 1, 2):
        r = mosquitto("mosquitto_pub", s.port, "-t", "sensors/t%d" % q, "-m", "v%d" % q, "-q", str(q))
        assert r.returncode == 0, r.stderr
    r = mosquitto("mosquitto_pub", s.port, "-t", "sensors/end", "-m", "end", "-q", "1", "-V", "mqttv5")
    assert r.returncode == 0, r.stderr
    out, _ = sub.communicate(timeout=TIMEOUT)
    got = [l for l in out.splitlines() if l.startswith("sensors/")]
    assert got == ["sensors/t0 v0", "sensors/t1 v1", "sensors/t2 v2", "sensors/end end"]
    assert sub.returncode == 0


def test_mosquitto_retained_set_replaced_cleared_and_kept_across_restarts(stack):
    s = stack()
    pub = lambda *a: mosquitto("mosquitto_pub", s.port, *a)  # noqa: E731
    assert pub("-t", "state/lamp", "-m", "on", "-r", "-q", "1").returncode == 0
    assert pub("-t", "state/lamp", "-m", "off", "-r", "-q", "1").returncode == 0
    assert pub("-t", "state/door", "-m", "open", "-r", "-q", "1").returncode == 0
    assert pub("-t", "state/fan", "-m", "fast", "-r", "-q", "1").returncode == 0
    # An empty retained message removes the topic's.
    assert pub("-t", "state/fan", "-n", "-r", "-q", "1").returncode == 0

    def retained():
        r = mosquitto("mosquitto_sub", s.port, "-t", "state/#", "-v", "--retained-only", "-C", "2",
                      "-W", str(TIMEOUT), "-q", "1")
        return sorted(r.stdout.splitlines())

    assert retained() == ["state/door open", "state/lamp off"]
    # Both the broker and the gateway killed (-9) and started again.
    s.restart_broker()
    s.restart_gateway()
    assert retained() == ["state/door open", "state/lamp off"]


# ---- paho, both protocol versions ----

@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
def test_qos_0_1_2_both_ways_is_the_minimum_and_in_order(stack, clients, v5):
    s = stack()
    subs = {q: clients(s.port, v5=v5) for q in (0, 1, 2)}
    for q, c in subs.items():
        assert c.subscribe("qos/+/x", qos=q) == [q]
    pub = clients(s.port, v5=v5)
    for q in (0, 1, 2):
        for i in range(20):
            assert pub.publish("qos/%d/x" % q, b"%d-%d" % (q, i), qos=q, wait=(i == 19)) is not None
    pub.publish("qos/end/x", b"end", qos=2)
    for sq, c in subs.items():
        got = []
        while True:
            m = c.receive()
            if m.payload == b"end":
                break
            got.append(m)
        # QoS 0 may be dropped only by a slow client's buffer, which these
        # are not: everything arrives, once, in order per publisher.
        assert [m.payload for m in got] == [b"%d-%d" % (q, i) for q in (0, 1, 2) for i in range(20)]
        for m in got:
            pq = int(m.topic.split("/")[1])
            assert m.qos == min(pq, sq), (m.topic, m.qos, sq)


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
def test_wildcards_and_shared_subscriptions(stack, clients, v5):
    s = stack()
    plus = clients(s.port, v5=v5)
    hash_ = clients(s.port, v5=v5)
    members = [clients(s.port, v5=v5) for _ in range(2)]
    assert plus.subscribe("home/+/temp", 1) == [1]
    assert hash_.subscribe("home/#", 1) == [1]
    for m in members:
        assert m.subscribe("$share/g1/home/#", 1) == [1]
    pub = clients(s.port, v5=v5)
    topics = ["home/kitchen/temp", "home/kitchen/humidity", "home/attic/temp", "home", "garden/temp"]
    n = 10
    for i in range(n):
        for t in topics:
            pub.publish(t, b"%s %d" % (t.encode(), i), qos=1, wait=False)
    pub.publish("home/end/temp", b"end", qos=1)
    hit = lambda m: m.payload == b"end"  # noqa: E731

    def until_end(c):
        out = []
        while True:
            m = c.receive()
            if hit(m):
                return out
            out.append(m.topic)
        return out

    assert until_end(plus) == [t for i in range(n) for t in ("home/kitchen/temp", "home/attic/temp")]
    assert until_end(hash_) == [t for i in range(n) for t in topics if t.startswith("home")]
    # Each message of the group's filter went to exactly one member.
    got = []
    ends = 0
    while ends < 1:
        for m in members:
            while not m.messages.empty():
                msg = m.receive()
                if hit(msg):
                    ends += 1
                else:
                    got.append(msg.payload)
        time.sleep(0.01)
    expect = sorted(b"%s %d" % (t.encode(), i) for i in range(n) for t in topics if t.startswith("home"))
    # The marker went to one member; the other may still be taking its last ones.
    deadline = time.monotonic() + TIMEOUT
    while len(got) < len(expect) and time.monotonic() < deadline:
        for m in members:
            while not m.messages.empty():
                got.append(m.receive().payload)
        time.sleep(0.01)
    assert sorted(got) == expect


def test_v5_subscription_options_and_properties(stack, clients):
    s = stack()
    c = clients(s.port, v5=True)
    # No-local: a client's own publications are not sent back to it.
    assert c.subscribe("echo/#", 1, noLocal=True) == [1]
    other = clients(s.port, v5=True)
    props = Properties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = 42
    assert other.subscribe_with("echo/#", 1, props) == [1]
    c.publish("echo/a", b"mine", qos=1)
    other.publish("echo/a", b"theirs", qos=1)
    m = c.receive()
    assert m.payload == b"theirs"
    got = other.receive_n(2)
    assert [x.payload for x in got] == [b"mine", b"theirs"]
    assert got[0].properties.SubscriptionIdentifier == [42]
    # Properties travel publisher to subscriber.
    p = Properties(PacketTypes.PUBLISH)
    p.ContentType = "application/json"
    p.ResponseTopic = "echo/replies"
    p.CorrelationData = b"corr-1"
    p.UserProperty = [("k1", "v1"), ("k2", "v2")]
    p.MessageExpiryInterval = 120
    p.PayloadFormatIndicator = 1
    c.publish("echo/b", b'{"x":1}', qos=1, props=p)
    m = other.receive()
    assert m.payload == b'{"x":1}'
    mp = m.properties
    assert mp.ContentType == "application/json"
    assert mp.ResponseTopic == "echo/replies"
    assert mp.CorrelationData == b"corr-1"
    assert sorted(mp.UserProperty) == [("k1", "v1"), ("k2", "v2")]
    assert 0 < mp.MessageExpiryInterval <= 120
    assert mp.PayloadFormatIndicator == 1
    # Topic aliases from the client: set with the topic, then used alone.
    assert c.connack_props.TopicAliasMaximum > 0
    a = Properties(PacketTypes.PUBLISH)
    a.TopicAlias = 3
    c.publish("echo/aliased", b"one", qos=1, props=a)
    c.publish("", b"two", qos=1, props=a)
    got = other.receive_n(2)
    assert [(x.topic, x.payload) for x in got] == [("echo/aliased", b"one"), ("echo/aliased", b"two")]


def test_retain_flag_and_retain_handling(stack, clients):
    s = stack()
    pub = clients(s.port, v5=True)
    pub.publish("r/a", b"kept", qos=1, retain=True)
    c = clients(s.port, v5=True)
    assert c.subscribe("r/#", 1) == [1]
    m = c.receive()
    assert (m.topic, m.payload, m.retain) == ("r/a", b"kept", True)
    # A live publication of a retained message reaches existing
    # subscribers without the flag unless they asked retain-as-published.
    rap = clients(s.port, v5=True)
    assert rap.subscribe("r/#", 1, retainAsPublished=True) == [1]
    assert rap.receive().retain is True
    pub.publish("r/a", b"new", qos=1, retain=True)
    assert c.receive().retain is False
    m = rap.receive()
    assert (m.payload, m.retain) == (b"new", True)
    # Retain handling 2: no retained messages on subscribe.
    none = clients(s.port, v5=True)
    assert none.subscribe("r/#", 1, retainHandling=2) == [1]
    pub.publish("r/mark", b"mark", qos=1)
    assert none.receive().payload == b"mark"


# ---- persistent sessions ----

@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
def test_persistent_session_across_disconnect_and_gateway_kill(stack, clients, v5):
    s = stack()
    kw = persistent("meter-1", v5, 3600)
    pub = away_with_messages(clients, s.port, kw, "meters/#", "meters/m1", [b"a%d" % i for i in range(10)])
    c = clients(s.port, **kw)
    assert c.session_present is True
    assert [m.payload for m in c.receive_n(10)] == [b"a%d" % i for i in range(10)]
    c.disconnect()
    for i in range(10):
        pub.publish("meters/m1", b"b%d" % i, qos=1)
    pub.close()
    # Everything PUBACKed is kept by the broker, not by the gateway.
    s.restart_gateway()
    c = clients(s.port, **kw)
    assert c.session_present is True
    assert [m.payload for m in c.receive_n(10)] == [b"b%d" % i for i in range(10)]
    # A clean session leaves nothing behind.
    c.disconnect()
    if v5:
        clean = clients(s.port, v5=True, client_id="meter-1", clean=True, expiry=0)
    else:
        clean = clients(s.port, client_id="meter-1", clean=True)
    assert clean.session_present is False
    clean.disconnect()
    pub = clients(s.port, v5=v5)
    pub.publish("meters/m1", b"lost", qos=1)
    c = clients(s.port, **kw)
    assert c.session_present is False
    assert c.subscribe("meters/#", 1) == [1]
    pub.publish("meters/m1", b"after", qos=1)
    assert c.receive().payload == b"after"


def test_qos2_inbound_is_exactly_once_across_a_reconnect(stack, clients):
    """A PUBLISH repeated with DUP after a reconnect (the client never saw
    PUBREC) is delivered once; PUBREL after a reconnect completes."""
    s = stack()
    sub = clients(s.port, v5=True)
    assert sub.subscribe("q2/#", 2) == [2]
    raw = Raw(s.port)
    props = b"\x11" + (3600).to_bytes(4, "big")  # session expiry
    raw.send(connect_packet(5, "q2-pub", props=props))
    assert raw.read_packet()[0] == 0x20
    raw.send(publish_packet("q2/a", b"once", qos=2, version=5, pid=7))
    rec = raw.read_packet()
    assert rec[0] == 0x50
    raw.close()
    raw = Raw(s.port)
    raw.send(connect_packet(5, "q2-pub", props=props, flags=0))
    ack = raw.read_packet()
    assert ack[0] == 0x20 and ack[1][0] & 1 == 1  # session present
    # The same publication again with DUP: PUBREC, and not a second copy.
    raw.send(publish_packet("q2/a", b"once", version=5, pid=7, flags=0x0C))
    assert raw.read_packet()[0] == 0x50
    raw.send(packet(0x62, (7).to_bytes(2, "big")))
    assert raw.read_packet()[0] == 0x70
    raw.send(publish_packet("q2/a", b"marker", qos=1, version=5, pid=8))
    assert raw.read_packet()[0] == 0x40
    got = [sub.receive().payload, sub.receive().payload]
    assert got == [b"once", b"marker"]
    raw.close()


@pytest.mark.parametrize("v5", [False, True])
def test_a_silent_client_is_dropped_after_its_keep_alive_and_a_pinging_one_stays(stack, v5):
    """Nothing heard for 1.5 x Keep Alive closes the connection (5.0 with
    DISCONNECT 0x8D first); a client that sends PINGREQs stays connected."""
    s = stack()
    version = 5 if v5 else 4
    quiet, pinging = Raw(s.port), Raw(s.port)
    quiet.send(connect_packet(version, "ka-quiet", keep_alive=1))
    pinging.send(connect_packet(version, "ka-ping", keep_alive=1))
    assert quiet.read_packet()[0] == 0x20 and pinging.read_packet()[0] == 0x20
    started = time.monotonic()
    quiet.s.settimeout(0.3)
    while True:
        pinging.send(packet(0xC0, b""))
        assert pinging.read_packet()[0] == 0xD0
        try:
            last = quiet.read_packet()
            break
        except socket.timeout:
            assert time.monotonic() - started < TIMEOUT, "the silent client was never dropped"
    # Never before 1.5 x Keep Alive (MQTT-3.1.2-24).
    assert time.monotonic() - started >= 1.4
    if v5:
        assert last[0] == 0xE0 and last[1][0] == 0x8D
        assert quiet.read_packet() is None
    else:
        assert last is None
    for _ in range(3):
        pinging.send(packet(0xC0, b""))
        assert pinging.read_packet()[0] == 0xD0
    quiet.close()
    pinging.close()


def test_mqtts_and_websocket_listeners_carry_the_same_topics(stack, clients, tmpdir_path):
    """Clients over TLS (paho, mosquitto_pub) and over WebSocket with the
    `mqtt` subprotocol (paho) share topics with plain TCP clients."""
    ca, cert, key = make_certs(tmpdir_path)
    s = stack(gateway_args=("--mqtts", "127.0.0.1:0", "--mqtt-ws", "127.0.0.1:0",
                            "--tls-cert", cert, "--tls-key", key))
    ports = s.gateway.ports
    over_tls = {"tls_ca": ca, "host": "localhost"}
    tls_sub = clients(ports["mqtts"], **over_tls)
    ws_sub = clients(ports["mqtt-ws"], transport="websockets", v5=True)
    assert tls_sub.subscribe("edge/#", 1) == [1]
    assert ws_sub.subscribe("edge/#", 1) == [1]
    sent = []
    for name, port, kw in (("tcp", s.port, {}), ("tls", ports["mqtts"], over_tls),
                           ("ws", ports["mqtt-ws"], {"transport": "websockets"})):
        body = ("from " + name).encode()
        assert clients(port, **kw).publish("edge/" + name, body, qos=1) == 0
        sent.append(body)
    r = subprocess.run(["mosquitto_pub", "-h", "localhost", "-p", str(ports["mqtts"]), "--cafile", ca,
                        "-q", "1", "-t", "edge/mosquitto", "-m", "from mosquitto"],
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    sent.append(b"from mosquitto")
    for sub in (tls_sub, ws_sub):
        assert [m.payload for m in sub.receive_n(len(sent))] == sent
    # A plain client on the TLS port gets a TLS alert or nothing, never a CONNACK.
    raw = Raw(ports["mqtts"])
    raw.send(connect_packet(4, "not-tls"))
    try:
        answer = raw.read_packet()
    except (ConnectionError, OSError):
        answer = None
    assert answer is None or answer[0] != 0x20
    raw.close()


def test_session_expiry_removes_the_session(stack, clients):
    s = stack()
    c = clients(s.port, v5=True, client_id="short", clean=False, expiry=1)
    assert c.subscribe("x/#", 1) == [1]
    c.disconnect()
    deadline = time.monotonic() + TIMEOUT
    # The broker's subscription of the session goes once it expired.
    while any("short" in a for a in s.broker.queues()):
        assert time.monotonic() < deadline, s.broker.queues()
        time.sleep(0.2)
    c = clients(s.port, v5=True, client_id="short", clean=False, expiry=60)
    assert c.session_present is False


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
def test_a_second_connect_with_the_client_id_takes_the_session_over(stack, clients, v5):
    s = stack()
    kw = persistent("twin", v5, 600)
    first = clients(s.port, **kw)
    assert first.subscribe("twin/#", 1) == [1]
    second = clients(s.port, **kw)
    assert second.session_present is True
    assert first.disconnected.wait(TIMEOUT)
    if v5:
        assert first.disconnect_reason == 0x8E
    clients(s.port, v5=v5).publish("twin/a", b"to the second", qos=1)
    assert second.receive().payload == b"to the second"


def test_will_is_published_when_the_connection_is_lost(stack, clients):
    s = stack()
    watcher = clients(s.port, v5=True)
    assert watcher.subscribe("wills/#", 1) == [1]
    dying = clients(s.port, v5=True, will=("wills/dev1", b"gone", 1, False))
    polite = clients(s.port, v5=True, will=("wills/dev2", b"gone too", 1, False))
    polite.disconnect()
    dying.drop()
    m = watcher.receive()
    assert (m.topic, m.payload) == ("wills/dev1", b"gone")
    clients(s.port, v5=True).publish("wills/mark", b"mark", qos=1)
    assert watcher.receive().payload == b"mark"


# ---- MQTT and AMQP on one address space ----

def test_mqtt_and_amqp_share_topics_with_properties(stack, clients):
    s = stack(IOT)
    url = s.router.url
    sub = clients(s.port, v5=True, user="dev@iot", password="dev-pw")
    assert sub.subscribe("sensors/#", 1) == [1]
    amqp = connect(url, user="dev", password="dev-pw", virtual_host="iot", allowed_mechs="PLAIN")
    rcv = amqp.create_receiver("sensors/#", credit=10)
    # AMQP to MQTT: a data section with properties.
    snd = amqp.create_sender("sensors/amqp")
    snd.send(Message(body=b"\x01\x02", inferred=True, content_type="application/octet-stream",
                     reply_to="sensors/replies", correlation_id="corr-a", ttl=60,
                     properties={"site": "north"}))
    m = sub.receive()
    assert (m.topic, m.payload, m.qos) == ("sensors/amqp", b"\x01\x02", 1)
    assert m.properties.ContentType == "application/octet-stream"
    assert m.properties.ResponseTopic == "sensors/replies"
    assert m.properties.CorrelationData == b"corr-a"
    assert ("site", "north") in m.properties.UserProperty
    assert 0 < m.properties.MessageExpiryInterval <= 60
    assert rcv.receive(timeout=TIMEOUT).body == b"\x01\x02"
    rcv.accept()
    # An amqp-value string arrives as its UTF-8 text.
    snd.send(Message(body="plain text"))
    assert sub.receive().payload == b"plain text"
    assert rcv.receive(timeout=TIMEOUT).body == "plain text"
    rcv.accept()
    # MQTT to AMQP.
    p = Properties(PacketTypes.PUBLISH)
    p.ContentType = "text/plain"
    p.ResponseTopic = "sensors/back"
    p.CorrelationData = b"corr-m"
    p.UserProperty = [("unit", "C")]
    p.MessageExpiryInterval = 30
    pub = clients(s.port, v5=True, user="dev@iot", password="dev-pw")
    pub.publish("sensors/mqtt", b"21.5", qos=1, props=p)
    am = rcv.receive(timeout=TIMEOUT)
    rcv.accept()
    assert am.body == b"21.5"
    assert am.address == "sensors/mqtt"
    assert am.content_type == "text/plain"
    assert am.reply_to == "sensors/back"
    assert bytes(am.correlation_id) == b"corr-m"
    assert am.properties == {"unit": "C"}
    assert 0 < am.ttl <= 30
    assert sub.receive().payload == b"21.5"
    amqp.close()


# ---- tenants and authorization ----

@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
def test_tenants_never_see_each_other_and_refusals_use_mqtt_codes(stack, clients, v5):
    s = stack(IOT)
    # Logins: a wrong password, another space's password, no such space.
    for user, pw in [("dev@iot", "other-pw"), ("dev@other", "dev-pw"), ("dev@nowhere", "x")]:
        with pytest.raises(Refused) as e:
            clients(s.port, v5=v5, user=user, password=pw)
        assert e.value.code in (0x86, 0x87), (user, e.value.code)
    a = clients(s.port, v5=v5, user="dev@iot", password="dev-pw")
    b = clients(s.port, v5=v5, user="dev@other", password="other-pw")
    # Anonymous clients land in `default` (zero-config on loopback).
    anon = clients(s.port, v5=v5)
    assert a.subscribe("#", 1) == [1]
    assert b.subscribe("#", 1) == [1]
    assert anon.subscribe("#", 1) == [1]
    a.publish("sensors/t", b"in iot", qos=1)
    b.publish("sensors/t", b"in other", qos=1)
    assert a.receive().payload == b"in iot"
    assert b.receive().payload == b"in other"
    a.publish("sensors/t", b"iot again", qos=1)
    assert a.receive().payload == b"iot again"
    b.publish("sensors/t", b"other again", qos=1)
    assert b.receive().payload == b"other again"
    # Recv-only on sensors/#: other filters fail, publishing is refused.
    r = clients(s.port, v5=v5, user="reader@iot", password="reader-pw")
    assert r.subscribe("sensors/#", 1) == [1]
    assert r.subscribe("secrets/#", 1) == [0x87 if v5 else 0x80]
    if v5:
        assert r.publish("sensors/t", b"nope", qos=1) == 0x87
        assert not r.disconnected.is_set()
    else:
        r.publish("sensors/t", b"nope", qos=1, wait=False)
        assert r.disconnected.wait(TIMEOUT)
    a.publish("sensors/t", b"mark", qos=1)
    assert a.receive().payload == b"mark"
    anon.publish("sensors/t", b"anon mark", qos=1)
    assert anon.receive().payload == b"anon mark"
    assert b.nothing_more()


# ---- bad input ----

V5_BAD = [
    # (name, packets after CONNECT (None: instead of it), v5 reason code)
    ("malformed", [packet(0x30, b"\x00\x10ab")], 0x81),
    ("second CONNECT", ["connect"], 0x82),
    ("wildcard in PUBLISH topic", [publish_packet("a/+", version=5)], 0x90),
    ("invalid UTF-8", [packet(0x30, utf8(b"a\xff\xfe") + b"\x00x")], 0x81),
    ("over the maximum size", [b"\x30" + varint(2 * 1024 * 1024) + b"\x00"], 0x95),
    ("QoS 3", [publish_packet("a", version=5, flags=0x06)], 0x81),
    ("topic alias 0", [publish_packet("a", version=5, props=b"\x23\x00\x00")], 0x94),
    ("unknown topic alias", [publish_packet("", version=5, props=b"\x23\x00\x05")], 0x82),
    ("subscription identifier on a PUBLISH", [publish_packet("a", version=5, props=b"\x0b\x05")], 0x82),
    ("packet identifier 0", [packet(0x32, utf8("a") + b"\x00\x00\x00x")], 0x81),
    ("SUBSCRIBE with QoS 3", [packet(0x82, b"\x00\x01\x00" + utf8("a") + b"\x03")], 0x81),
    ("SUBSCRIBE with reserved option bits", [packet(0x82, b"\x00\x01\x00" + utf8("a") + b"\x41")], 0x81),
]


@pytest.mark.parametrize("name,after,code", V5_BAD, ids=[b[0] for b in V5_BAD])
def test_bad_input_gets_the_protocols_answer_and_hurts_no_one(stack, clients, name, after, code):
    s = stack()
    bystander = clients(s.port, v5=True)
    assert bystander.subscribe("ok/#", 1) == [1]
    raw = Raw(s.port)
    raw.send(connect_packet(5, "bad-" + name.replace(" ", "-")))
    assert raw.read_packet()[0] == 0x20
    for p in after:
        raw.send(connect_packet(5, "again") if p == "connect" else p)
    got = raw.until_closed()
    assert got, "closed without DISCONNECT"
    first, body = got[-1]
    assert first == 0xE0, got
    assert body[0] == code, (name, hex(body[0]))
    raw.close()
    clients(s.port, v5=True).publish("ok/x", b"still fine", qos=1)
    assert bystander.receive().payload == b"still fine"


def test_bad_connects(stack, clients):
    s = stack()
    # PUBLISH before CONNECT, and a protocol name we do not speak: closed.
    for first in (publish_packet("a"), connect_packet(4, name=b"MQTX")):
        raw = Raw(s.port)
        raw.send(first)
        assert raw.until_closed() == []
        raw.close()
    # A level we do not speak: CONNACK 0x01 (3.1.1) / 0x84 (5.0), then closed.
    for level, answer in ((3, 0x01), (6, 0x84)):
        raw = Raw(s.port)
        raw.send(connect_packet(level))
        got = raw.until_closed()
        assert got and got[0][0] == 0x20 and got[0][1][1] == answer, got
        raw.close()
    # 3.1.1: a wildcard in a PUBLISH topic closes the connection.
    raw = Raw(s.port)
    raw.send(connect_packet(4))
    assert raw.read_packet()[0] == 0x20
    raw.send(publish_packet("a/#"))
    assert raw.until_closed() == []
    c = clients(s.port)
    assert c.subscribe("fine", 0) == [0]


# ---- seen from the console ----

def _login(port, user, password):
    try:
        return Client(port, v5=True, user=user, password=password)
    except Refused:
        return None


def test_the_console_lists_mqtt_clients_serves_metrics_and_closes_them(console, tmpdir_path, clients):
    import urllib.request

    from test_console import create_space, create_user, until

    _, gw, procs = followers(console, tmpdir_path)
    try:
        create_space(console, "plant")
        console.expect("POST", "/api/v1/addressspaces/plant/addresses",
                       {"metadata": {"name": "lines"}, "spec": {"address": "lines/#", "type": "topic"}}, 201)
        create_user(console, "plant", "op", "op-pw", ["#"])

        def login():
            try:
                return Client(gw.port, v5=True, client_id="press-7", user="op@plant", password="op-pw")
            except Refused:
                return None

        c = until("the gateway to know the user", login)
        assert c.subscribe("lines/#", 1) == [1]

        def listed():
            items = console.expect("GET", "/api/v1/addressspaces/plant/connections")["items"]
            mine = [i for i in items if i.get("clientId") == "press-7"]
            return mine[0] if mine else None

        conn = until("the console to list the MQTT client", listed)
        assert conn["protocol"] == "mqtt5" and conn["user"] == "op"
        assert conn["subscriptions"] == [{"filter": "lines/#", "qos": 1}]
        req = urllib.request.Request(console.url + "/metrics", headers={"Authorization": "Bearer " + console.token})
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            text = r.read().decode()
        assert 'flotilla_mqtt_connections{gateway="%s",space="plant"} 1' % conn["gateway"] in text, text
        # Narrowing the user's rights ends the subscriptions it lost.
        console.expect("POST", "/api/v1/addressspaces/plant/addresses",
                       {"metadata": {"name": "alerts"}, "spec": {"address": "alerts/#", "type": "topic"}}, 201)
        create_user(console, "plant", "feeder", "feeder-pw", ["#"])
        until("the gateway to know alerts/#", lambda: c.subscribe("alerts/#", 1) == [1] or None)
        console.expect("PUT", "/api/v1/addressspaces/plant/users/op", {
            "metadata": {"name": "op"},
            "spec": {"username": "op", "password": "op-pw",
                     "authorization": [{"addresses": ["alerts/#"], "operations": ["send", "recv"]}]},
        })

        def narrowed():
            item = listed()
            return item if item and [x["filter"] for x in item["subscriptions"]] == ["alerts/#"] else None

        conn = until("the gateway to end the subscription", narrowed)
        feeder = until("the gateway to know feeder", lambda: _login(gw.port, "feeder@plant", "feeder-pw"))
        feeder.publish("lines/1", b"not for op", qos=1)
        feeder.publish("alerts/1", b"for op", qos=1)
        assert c.receive().payload == b"for op"
        feeder.close()
        console.expect("POST", "/api/v1/addressspaces/plant/connections/%s/%d/close" % (conn["gateway"], conn["id"]),
                       status=202)
        assert c.disconnected.wait(TIMEOUT)
        assert c.disconnect_reason == 0x98
    finally:
        for p in procs:
            p.stop()


def test_another_user_cannot_take_or_clear_a_session(stack, clients):
    s = stack(IOT)
    kw = {"v5": True, "client_id": "meter-9", "clean": False, "expiry": 600}
    own = clients(s.port, user="dev@iot", password="dev-pw", **kw)
    assert own.subscribe("sensors/#", 1) == [1]
    # While connected: not taken over by another user.
    with pytest.raises(Refused) as e:
        clients(s.port, v5=True, client_id="meter-9", user="reader@iot", password="reader-pw")
    assert e.value.code == 0x87
    assert not own.disconnected.is_set()
    own.disconnect()
    # While away: not cleared by another user's clean start.
    with pytest.raises(Refused) as e:
        clients(s.port, v5=True, client_id="meter-9", clean=True, user="reader@iot", password="reader-pw")
    assert e.value.code == 0x87
    back = clients(s.port, user="dev@iot", password="dev-pw", **kw)
    assert back.session_present is True


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
def test_a_session_moves_between_gateway_replicas(stack, clients, v5):
    """Nothing of a session lives only in one gateway: a client resumes on
    another replica, and a second connection there takes the session over."""
    s = stack()
    other = s.another_gateway()
    kw = persistent("roamer", v5, 600)
    pub = away_with_messages(clients, s.port, kw, "roam/#", "roam/x", [b"%d" % i for i in range(5)])
    there = clients(other.port, **kw)
    assert there.session_present is True
    assert [m.payload for m in there.receive_n(5)] == [b"%d" % i for i in range(5)]
    # The same client id on the first replica takes the session over.
    back = clients(s.port, **kw)
    assert back.session_present is True
    assert there.disconnected.wait(TIMEOUT)
    if v5:
        assert there.disconnect_reason == 0x8E
    pub.publish("roam/x", b"after", qos=1)
    # At least once: what the first replica had not yet settled with the
    # broker when the session moved may come again, marked DUP.
    while True:
        m = back.receive()
        if m.payload == b"after":
            break
        assert m.payload in [b"%d" % i for i in range(5)] and m.dup, (m.payload, m.dup)


def test_shared_subscriptions_and_retained_messages_span_gateway_replicas(stack, clients):
    """A shared subscription's members on two replicas share its messages,
    each message once; a retained message set through one replica is
    what a subscriber on the other gets."""
    s = stack()
    other = s.another_gateway()
    m1 = clients(s.port, v5=True, client_id="worker-1")
    m2 = clients(other.port, v5=True, client_id="worker-2")
    assert m1.subscribe("$share/grp/jobs/#", 1) == [1]
    assert m2.subscribe("$share/grp/jobs/#", 1) == [1]
    pub = clients(s.port, v5=True)
    bodies = [b"job %d" % i for i in range(40)]
    for b in bodies:
        pub.publish("jobs/x", b, qos=1)
    def next_of_either(deadline):
        while time.monotonic() < deadline:
            for c in (m1, m2):
                try:
                    return c, c.messages.get(timeout=0.1).payload
                except queue.Empty:
                    pass
        raise AssertionError("nothing more arrived")

    deadline = time.monotonic() + TIMEOUT
    got = [next_of_either(deadline) for _ in bodies]
    assert sorted(b for _, b in got) == sorted(bodies), "each job once"
    assert {c for c, _ in got} == {m1, m2}, "both members took jobs"
    # Nothing more was on its way: a marker comes next.
    pub.publish("jobs/mark", b"mark", qos=1)
    assert next_of_either(time.monotonic() + TIMEOUT)[1] == b"mark"
    # Retained through one replica, read through the other.
    clients(s.port, v5=True).publish("state/door", b"open", qos=1, retain=True)
    r = clients(other.port, v5=True)
    assert r.subscribe("state/#", 1) == [1]
    m = r.receive()
    assert (m.topic, m.payload, m.retain) == ("state/door", b"open", 1)


def test_cloudevents_keep_their_attributes_between_mqtt_and_amqp(stack, clients):
    """Binary mode: the MQTT binding's user properties are the AMQP
    binding's `cloudEvents:` application properties, both ways."""
    s = stack(IOT)
    sub = clients(s.port, v5=True, user="dev@iot", password="dev-pw")
    assert sub.subscribe("sensors/#", 1) == [1]
    amqp = connect(s.router.url, user="dev", password="dev-pw", virtual_host="iot", allowed_mechs="PLAIN")
    rcv = amqp.create_receiver("sensors/#", credit=10)
    p = Properties(PacketTypes.PUBLISH)
    p.ContentType = "application/json"
    p.UserProperty = [("specversion", "1.0"), ("type", "com.example.reading"), ("source", "/plant/7"),
                      ("id", "evt-1"), ("time", "2026-12-06T09:00:00Z"), ("site", "north")]
    clients(s.port, v5=True, user="dev@iot", password="dev-pw").publish("sensors/ce", b'{"t":21.5}', qos=1, props=p)
    am = rcv.receive(timeout=TIMEOUT)
    rcv.accept()
    assert am.content_type == "application/json"
    assert am.body == b'{"t":21.5}'
    assert am.properties == {"cloudEvents:specversion": "1.0", "cloudEvents:type": "com.example.reading",
                             "cloudEvents:source": "/plant/7", "cloudEvents:id": "evt-1",
                             "cloudEvents:time": "2026-12-06T09:00:00Z", "cloudEvents:site": "north"}
    assert sub.receive().payload == b'{"t":21.5}'
    # AMQP (binary mode, timestamps as AMQP timestamps) to MQTT 5.
    from proton import timestamp
    snd = amqp.create_sender("sensors/ce2")
    snd.send(Message(body=b"{}", inferred=True, content_type="application/json", properties={
        "cloudEvents:specversion": "1.0", "cloudEvents:type": "com.example.cmd",
        "cloudEvents:source": "/ops", "cloudEvents:id": "evt-2",
        "cloudEvents:time": timestamp(1700000000123)}))
    m = sub.receive()
    assert m.topic == "sensors/ce2"
    assert m.properties.ContentType == "application/json"
    assert sorted(m.properties.UserProperty) == sorted([
        ("specversion", "1.0"), ("type", "com.example.cmd"), ("source", "/ops"), ("id", "evt-2"),
        ("time", "2023-11-14T22:13:20.123Z")])
    rcv.receive(timeout=TIMEOUT)
    rcv.accept()
    amqp.close()


class _Props(ReceiverOption):
    """Link properties on an attach (what a gateway would name)."""

    def __init__(self, props):
        self.props = props

    def apply(self, link):
        link.properties = self.props


def test_tenants_cannot_pose_as_a_gateway_or_reach_its_addresses(stack, clients):
    """As a stranger and as another tenant would try it with stock proton:
    the gateway capability, the `$mqtt/` addresses the gateway keeps in the
    broker, and link properties naming another space or client."""
    s = stack(IOT)
    url = s.router.url
    other = clients(s.port, v5=True, client_id="victim", clean=False, expiry=600,
                    user="dev@other", password="other-pw")
    assert other.subscribe("sensors/#", 1) == [1]
    as_iot = dict(user="dev", password="dev-pw", virtual_host="iot", allowed_mechs="PLAIN")
    # The capability makes no gateway of a tenant (or of an anonymous client).
    for kw in (as_iot, {}):
        try:
            c = connect(url, offered_capabilities=[symbol("flotilla.gateway")], **kw)
            r = c.create_receiver("$mqtt/session", credit=1, options=_Props(
                {symbol("flotilla:space"): "other", symbol("flotilla:container-id"): "mqtt:victim"}))
            c.close()
            pytest.fail("a tenant attached to another space's MQTT session: %r" % r)
        except (ConnectionException, LinkDetached):
            pass
    # The gateway's addresses, plainly, through the router (as a tenant
    # and anonymously) and at the broker's own listener.
    for where, kw in ((url, as_iot), (url, {}), (s.broker.url, as_iot)):
        c = connect(where, **kw)
        for address in ("$mqtt/session", "$mqtt/retained/#", "$mqtt/retained/sensors/x"):
            with pytest.raises(LinkDetached):
                c.create_receiver(address, credit=1, options=_Props(
                    {symbol("flotilla:space"): "other", symbol("flotilla:container-id"): "mqtt:victim"}))
        for address in ("$mqtt/session-state", "$mqtt/retained"):
            with pytest.raises((LinkDetached, SendException)):
                c.create_sender(address).send(Message(body='{"session": "mqtt:victim", "delete": true}'))
        c.close()
    c = connect(url, **as_iot)
    # Naming another space on a link changes nothing: iot's receiver gets
    # iot's messages only.
    rcv = c.create_receiver("sensors/#", credit=10, options=_Props({symbol("flotilla:space"): "other"}))
    clients(s.port, v5=True, user="dev@other", password="other-pw").publish("sensors/x", b"other's", qos=1)
    clients(s.port, v5=True, user="dev@iot", password="dev-pw").publish("sensors/x", b"iot's", qos=1)
    assert rcv.receive(timeout=TIMEOUT).body == b"iot's"
    c.close()
    # The victim's session is intact.
    assert other.receive().payload == b"other's"
    other.disconnect()
    back = clients(s.port, v5=True, client_id="victim", clean=False, expiry=600,
                   user="dev@other", password="other-pw")
    assert back.session_present is True


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
def test_a_session_holds_at_most_max_subscriptions(stack, clients, v5):
    s = stack(gateway_args=("--max-subscriptions", "3"))
    c = clients(s.port, v5=v5)
    for f in ("m/1", "m/2", "m/3"):
        assert c.subscribe(f, 1) == [1]
    assert c.subscribe("m/4", 1) == [0x97 if v5 else 0x80]
    # Changing one it has is no new one; after an unsubscribe there is room.
    assert c.subscribe("m/3", 0) == [0]
    c.unsubscribe("m/1")
    assert c.subscribe("m/4", 1) == [1]
    clients(s.port, v5=v5).publish("m/4", b"in", qos=1)
    assert c.receive().payload == b"in"
