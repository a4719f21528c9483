"""The last-will service with clients no one here wrote: paho-mqtt and
python-qpid-proton register wills; the service (its own process) keeps
them on disk and publishes each, once, when its client's connection or its
gateway is lost.

Every test counts: each will that must arrive arrives once, and one that
must not is shown absent by a marker published afterwards arriving first."""

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from proton import ConnectionException, Message, symbol
from proton.reactor import LinkOption
from proton.utils import LinkDetached, SendException

from conftest import MESH_SECRET_FILE, TIMEOUT, Broker, Gateway, Lwt, Router, connect, flotilla_bin, followers
from mqtt_client import Raw, packet, utf8
from test_mqtt import GATEWAY_UP, IOT, clients, stack  # noqa: F401 (fixtures)


class _LinkProps(LinkOption):
    """Link properties on an attach, sender or receiver."""

    def __init__(self, props):
        self.props = props

    def apply(self, link):
        link.properties = self.props


def watcher(clients, port):
    w = clients(port, v5=True)
    assert w.subscribe("wills/#", 1) == [1]
    return w


def marker(clients, port, w, n=1):
    """Publishes a marker; it must be the next message `w` receives (so
    nothing else came before it)."""
    clients(port, v5=True).publish("wills/mark", b"mark %d" % n, qos=1)
    m = w.receive()
    assert (m.topic, m.payload) == ("wills/mark", b"mark %d" % n)


def connect_with_will(client_id, topic, message, keep_alive):
    """A 3.1.1 CONNECT with a QoS 1 will."""
    vh = utf8(b"MQTT") + bytes([4, 0x02 | 0x04 | (1 << 3)]) + struct.pack(">H", keep_alive)
    return packet(0x10, vh + utf8(client_id) + utf8(topic) + struct.pack(">H", len(message)) + message)


def test_a_lost_socket_and_a_keep_alive_timeout_fire_once_a_graceful_disconnect_never(stack, clients):
    s = stack()
    w = watcher(clients, s.port)
    polite = clients(s.port, client_id="polite", will=("wills/polite", b"polite", 1, False))
    asked = clients(s.port, client_id="asked", v5=True, will=("wills/asked", b"asked", 1, False))
    dropped = clients(s.port, client_id="dropped", v5=True, will=("wills/dropped", b"dropped", 1, False))
    silent = Raw(s.port)
    silent.send(connect_with_will("silent", "wills/silent", b"silent", keep_alive=1))
    assert silent.read_packet()[0] == 0x20
    polite.disconnect()
    # MQTT 5: DISCONNECT with reason 0x04 asks for the will.
    asked.c.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))
    dropped.drop()
    got = sorted((m.topic, m.payload) for m in (w.receive(), w.receive(), w.receive()))
    assert got == [("wills/asked", b"asked"), ("wills/dropped", b"dropped"), ("wills/silent", b"silent")]
    marker(clients, s.port, w)
    silent.close()
    # An operator sees the counts through any router.
    out = subprocess.run([flotilla_bin(), "stat", "--url", "amqp://" + s.router.url, "--mesh-secret-file",
                          MESH_SECRET_FILE, "--lwt", "--json"], capture_output=True, text=True, timeout=TIMEOUT,
                         check=True).stdout
    counts = json.loads(out)["spaces"]["default"]
    assert (counts["registered"], counts["cancelled"], counts["held"]) == (4, 1, 0), counts
    assert counts["fired"] == {"connectionLost": 2, "gatewayLost": 0, "asked": 1}, counts


@pytest.mark.parametrize("elsewhere", [False, True], ids=["same gateway", "another replica"])
def test_a_will_waits_its_delay_and_a_client_back_in_time_has_none(stack, clients, elsewhere):
    s = stack()
    back_at = s.another_gateway().port if elsewhere else s.port
    w = watcher(clients, back_at)
    # A will waits at most until the session ends: these sessions outlive
    # the delays.
    back = clients(s.port, client_id="back", v5=True, expiry=60,
                   will=("wills/back", b"back", 1, False, _will_delay(1)))
    gone = clients(s.port, client_id="gone", v5=True, expiry=60,
                   will=("wills/gone", b"gone", 1, False, _will_delay(2)))
    back.drop()
    # Back within its delay, without a will (on another replica: its
    # gateway's first word to the service): its will is never published.
    clients(back_at, client_id="back", v5=True, expiry=60)
    gone.drop()
    # `back`'s delay ends before `gone`'s: had it been published, it would
    # have come first.
    m = w.receive()
    assert (m.topic, m.payload) == ("wills/gone", b"gone")
    marker(clients, back_at, w)


def _will_delay(seconds):
    p = Properties(PacketTypes.WILLMESSAGE)
    p.WillDelayInterval = seconds
    return p


def test_a_killed_gateway_fires_the_wills_of_its_clients_only(stack, clients):
    """Killing a replica: the wills of its clients that do not come back
    go; one that reconnects to the other replica within its will delay
    resumes its session there and has no will published."""
    s = stack()
    other = s.another_gateway()
    w = watcher(clients, other.port)
    a = clients(s.port, client_id="a", will=("wills/a", b"a", 1, False))
    b = clients(s.port, client_id="b", v5=True, will=("wills/b", b"b", 1, False))
    mover = clients(s.port, client_id="mover", v5=True, clean=False, expiry=600,
                    will=("wills/mover", b"mover", 1, False, _will_delay(1)))
    assert mover.subscribe("jobs/#", 1) == [1]
    late = clients(s.port, client_id="late", v5=True, expiry=600,
                   will=("wills/late", b"late", 1, False, _will_delay(2)))
    safe = clients(other.port, client_id="safe", will=("wills/safe", b"safe", 1, False))
    s.gateway.stop()  # kill -9
    got = sorted((m.topic, m.payload) for m in (w.receive(), w.receive()))
    assert got == [("wills/a", b"a"), ("wills/b", b"b")]
    moved = clients(other.port, client_id="mover", v5=True, clean=False, expiry=600)
    assert moved.session_present is True
    # `mover`'s delay ends before `late`'s: had its will gone, it would
    # have come first.
    m = w.receive()
    assert (m.topic, m.payload) == ("wills/late", b"late")
    marker(clients, other.port, w)
    safe.disconnect()
    del a, b, late


def test_wills_kept_across_a_killed_service_still_fire(stack, clients):
    s = stack()
    w = watcher(clients, s.port)
    dev = clients(s.port, client_id="dev", v5=True, will=("wills/dev", b"dev", 1, False))
    s.lwt.restart()  # kill -9, then started again on its data
    dev.drop()
    m = w.receive()
    assert (m.topic, m.payload) == ("wills/dev", b"dev")
    marker(clients, s.port, w)


AMQP_WILL = textwrap.dedent("""
    import os, sys
    from proton import Message
    from proton.utils import BlockingConnection
    url, to, body, end = sys.argv[1:5]
    c = BlockingConnection(url, timeout=10)
    s = c.create_sender("$lwt")
    # Accepted once the service holds it on disk.
    s.send(Message(address=to, body=body, annotations={"x-opt-will-delay": 0}))
    if end == "close":
        c.close()
    elif end == "detach":
        s.close()  # the will is deleted; then the connection is lost
    os._exit(0)  # with "die": no Close, the connection is lost
""")


def amqp_will(url, to, body, end):
    subprocess.run([sys.executable, "-c", AMQP_WILL, url, to, body, end], check=True, timeout=TIMEOUT * 2)


def test_an_amqp_client_registers_a_will_at_lwt(stack, clients):
    s = stack()
    w = watcher(clients, s.port)
    amqp_will(s.router.url, "wills/amqp-polite", "polite", "close")
    amqp_will(s.router.url, "wills/amqp-detached", "detached", "detach")
    amqp_will(s.router.url, "wills/amqp-lost", "lost", "die")
    m = w.receive()
    assert (m.topic, m.payload) == ("wills/amqp-lost", b"lost")
    marker(clients, s.port, w)


def test_a_router_dying_between_gateway_and_service_fires_no_false_will(tmpdir_path, clients):
    """A chain A - B - C: the broker and a gateway on A, the service on C.
    B dies and comes back: the gateway's clients that stayed connected
    have no will published; one that died meanwhile has its will, once."""
    procs = []
    keep = lambda p: procs.append(p) or p  # noqa: E731
    try:
        a = keep(Router("--inter-router", "127.0.0.1:0", "--router-id", "A"))
        c = keep(Router("--inter-router", "127.0.0.1:0", "--router-id", "C"))
        b_args = ("--router-id", "B",
                  "--peer", "127.0.0.1:%d" % a.ports["inter-router"],
                  "--peer", "127.0.0.1:%d" % c.ports["inter-router"])
        b = keep(Router(*b_args))
        a.wait_for_log(r'mesh routes routes=\[.*"C via B')
        keep(Broker(os.path.join(tmpdir_path, "broker"), "--router", a.url))
        a.wait_for_log(r"broker connected \(route container\)")
        keep(Lwt(os.path.join(tmpdir_path, "lwt"), c))
        gw = keep(Gateway("--router", a.url))
        a.wait_for_log(GATEWAY_UP, count=2)
        w = watcher(clients, gw.port)
        alive = clients(gw.port, client_id="alive", will=("wills/alive", b"alive", 1, False))
        dies = clients(gw.port, client_id="dies", v5=True, will=("wills/dies", b"dies", 1, False))
        b.stop()  # kill -9: the path from the gateway to the service is gone
        a.wait_for_log(r'mesh routes routes=\[(?!.*C via)')
        dies.drop()
        b = keep(Router(*b_args))
        a.wait_for_log(r'mesh routes routes=\[.*"C via B', count=2)
        m = w.receive(timeout=TIMEOUT * 2)
        assert (m.topic, m.payload) == ("wills/dies", b"dies")
        marker(clients, gw.port, w)
        assert alive.c.is_connected()
    finally:
        for p in reversed(procs):
            p.stop()


def test_the_console_counts_wills_per_space_and_serves_them_as_metrics(console, tmpdir_path, clients):
    import urllib.request

    from test_console import until

    _, gw, procs = followers(console, tmpdir_path, lwt=True)
    try:
        w = watcher(clients, gw.port)
        clients(gw.port, client_id="polite", will=("wills/polite", b"p", 1, False)).disconnect()
        clients(gw.port, client_id="lost", will=("wills/lost", b"l", 1, False)).drop()
        assert w.receive().topic == "wills/lost"

        def counted():
            items = console.expect("GET", "/api/v1/addressspaces/default/wills")["items"]
            got = items[0] if items else None
            return got if got and got["fired"]["connectionLost"] == 1 and got["cancelled"] == 1 else None

        got = until("the service to report its counts", counted)
        assert got["registered"] == 2 and got["held"] == 0
        req = urllib.request.Request(console.url + "/metrics", headers={"Authorization": "Bearer " + console.token})
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            text = r.read().decode()
        assert 'flotilla_lwt_fired_total{service="%s",space="default",cause="connection_lost"} 1' % got["service"] in text
    finally:
        for p in reversed(procs):
            p.stop()


def test_a_frozen_gateway_is_noticed_and_the_wills_of_its_mosquitto_clients_fire(tmpdir_path, clients):
    """A gateway that stops answering (SIGSTOP: a partition, not a death)
    is noticed by its router's idle timeout; the service then publishes
    its clients' wills. The clients here are mosquitto_sub processes."""
    procs, tools = [], []
    try:
        router = Router("--idle-timeout", "2")
        procs.append(router)
        procs.append(Broker(os.path.join(tmpdir_path, "broker"), "--router", router.url))
        router.wait_for_log(r"broker connected \(route container\)")
        procs.append(Lwt(os.path.join(tmpdir_path, "lwt"), router))
        frozen = Gateway("--router", router.url, "--gateway-id", "frozen")
        procs.append(frozen)
        alive = Gateway("--router", router.url, "--gateway-id", "alive")
        procs.append(alive)
        router.wait_for_log(GATEWAY_UP, count=4)
        w = watcher(clients, alive.port)
        for dev in ("m1", "m2"):
            tools.append(subprocess.Popen(
                ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(frozen.port), "-i", dev, "-t", "cmd/" + dev,
                 "--will-topic", "wills/" + dev, "--will-payload", dev + " gone", "--will-qos", "1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # Both registered: the gateway counts them as connected.
        deadline = time.monotonic() + TIMEOUT
        while sum(1 for l in list(frozen.log) if "MQTT client connected" in l) < 2:
            assert time.monotonic() < deadline, "mosquitto_sub did not connect"
            time.sleep(0.05)
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        try:
            got = sorted((m.topic, m.payload) for m in (w.receive(), w.receive()))
        except Exception:
            print("ROUTER", "".join(router.log[-30:]))
            print("LWT", "".join(procs[2].log[-30:]))
            print("FROZEN", "".join(frozen.log[-15:]))
            raise
        assert got == [("wills/m1", b"m1 gone"), ("wills/m2", b"m2 gone")]
        marker(clients, alive.port, w)
        os.kill(frozen.proc.pid, signal.SIGCONT)
    finally:
        for t in tools:
            t.kill()
            t.wait()
        for p in reversed(procs):
            p.stop()


def test_a_retained_will_becomes_the_topic_s_retained_message(stack, clients):
    s = stack()
    w = watcher(clients, s.port)
    dev = clients(s.port, client_id="door", will=("wills/door", b"door offline", 1, True))
    dev.drop()
    m = w.receive()
    assert (m.topic, m.payload) == ("wills/door", b"door offline")
    later = clients(s.port, v5=True)
    assert later.subscribe("wills/door", 1) == [1]
    m = later.receive()
    assert (m.topic, m.payload, m.retain) == ("wills/door", b"door offline", 1)


def test_a_takeover_replaces_the_will(stack, clients):
    """A second connection with the client id takes the session over: the
    first connection's will is not published; the second's is, when it
    is lost."""
    s = stack()
    w = watcher(clients, s.port)
    first = clients(s.port, client_id="twin", v5=True, will=("wills/twin", b"first", 1, False))
    second = clients(s.port, client_id="twin", v5=True, will=("wills/twin", b"second", 1, False))
    assert first.disconnected.wait(TIMEOUT) and first.disconnect_reason == 0x8E
    second.drop()
    m = w.receive()
    assert (m.topic, m.payload) == ("wills/twin", b"second")
    marker(clients, s.port, w)


def test_wills_stay_in_their_space_under_their_users_rules(stack, clients):
    s = stack(IOT)
    iot = clients(s.port, v5=True, user="dev@iot", password="dev-pw")
    other = clients(s.port, v5=True, user="dev@other", password="other-pw")
    assert iot.subscribe("sensors/#", 1) == [1] and other.subscribe("sensors/#", 1) == [1]
    clients(s.port, v5=True, client_id="probe", user="dev@iot", password="dev-pw",
            will=("sensors/probe", b"probe gone", 1, False)).drop()
    m = iot.receive()
    assert (m.topic, m.payload) == ("sensors/probe", b"probe gone")
    # The other space saw nothing: its own marker comes first.
    clients(s.port, v5=True, user="dev@other", password="other-pw").publish("sensors/mark", b"mark", qos=1)
    assert other.receive().payload == b"mark"
    url = s.router.url
    as_reader = dict(user="reader", password="reader-pw", virtual_host="iot", allowed_mechs="PLAIN")
    c = connect(url, **as_reader)
    # reader may not send to sensors/#: its will there is refused.
    with pytest.raises(SendException):
        c.create_sender("$lwt").send(Message(address="sensors/x", body="nope"))
    # Nothing comes out of $lwt, whoever asks.
    with pytest.raises(LinkDetached):
        c.create_receiver("$lwt", credit=1)
    c.close()
    # Properties claiming a gateway or a user are the router's to set: a
    # tenant's are dropped. As a gateway's, this message would be refused
    # (it is no will operation); as reader's, too (reader may not send
    # there): it is dev's own will, and accepted.
    c = connect(url, user="dev", password="dev-pw", virtual_host="iot", allowed_mechs="PLAIN")
    forged = c.create_sender("$lwt", options=_LinkProps({symbol("flotilla:gateway"): "mqtt-gateway.0",
                                                         symbol("flotilla:user"): "reader"}))
    forged.send(Message(address="sensors/forged", body="dev's own"))
    c.close()
    # A stranger (no credentials; the space takes no anonymous clients).
    with pytest.raises(ConnectionException):
        connect(url, virtual_host="iot").create_sender("$lwt")
