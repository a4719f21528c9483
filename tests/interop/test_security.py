"""Tenant isolation tried the way an attacker would, with stock
python-qpid-proton clients (SECURITY.md): the inter-router port takes
only routers that prove the mesh credential; being a route container
(a broker) takes the component credential, never a tenant's; the address
space is chosen by hostname for every login and a space's password never
opens another; spaces can require TLS; a broker gone for good can be
retired so its queues move."""

import json
import os
import socket
import subprocess
import time

import pytest
from proton import ConnectionException, Delivery, Message, SSLDomain, symbol
from proton.reactor import AtMostOnce
from proton.utils import LinkDetached, SendException

from test_proton import Recv, Send

from conftest import (
    TIMEOUT,
    Console,
    Scenario,
    connect,
    flotilla_bin,
    make_certs,
    wait_until,
)

BROKER_UP = r"broker connected \(route container\)"

TENANTS = """
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: tenant-a}
spec: {authentication: {anonymous: false}}
---
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: tenant-b}
spec: {authentication: {anonymous: false}}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: orders}
spec: {addressSpace: tenant-a, address: orders, type: queue}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: orders}
spec: {addressSpace: tenant-b, address: orders, type: queue}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: events}
spec: {addressSpace: tenant-b, address: events, type: anycast}
---
apiVersion: flotilla.dev/v1
kind: MessagingUser
metadata: {name: mallory}
spec:
  addressSpace: tenant-a
  username: mallory
  password: mallory-pw
  authorization: [{addresses: ["#"], operations: [send, recv, view, manage]}]
---
apiVersion: flotilla.dev/v1
kind: MessagingUser
metadata: {name: app}
spec:
  addressSpace: tenant-a
  username: app
  password: a-secret
  authorization: [{addresses: ["#"], operations: [send, recv]}]
---
apiVersion: flotilla.dev/v1
kind: MessagingUser
metadata: {name: app}
spec:
  addressSpace: tenant-b
  username: app
  password: b-secret
  authorization: [{addresses: ["#"], operations: [send, recv]}]
"""


def refused(url, **kw):
    """Connects and opens a receiver; returns the error if refused."""
    try:
        c = connect(url, **kw)
        c.create_receiver("orders", credit=1)
        c.close()
    except (ConnectionException, LinkDetached) as e:
        return str(e)
    return None


def round_trip(url, address, body, **kw):
    """Sends `body` to `address` and receives it back on one connection."""
    c = connect(url, **kw)
    rcv = c.create_receiver(address, credit=1)
    # Pre-settled: a blocking unsettled send would wait for the outcome
    # this same thread gives only after it returns.
    c.create_sender(address, options=AtMostOnce()).send(Message(body=body))
    m = rcv.receive(timeout=TIMEOUT)
    c.close()
    return m.body


def raw_exchange(port, data):
    """Sends `data` to 127.0.0.1:`port`; returns everything the server
    sends back before it closes (bounded by TIMEOUT)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    s.sendall(data)
    got = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    except socket.timeout:
        pass
    s.close()
    return got


AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
SASL_HEADER = b"AMQP\x03\x01\x00\x00"
OPEN_CODE = b"\x53\x10"  # the descriptor of an Open performative


def test_an_unauthenticated_peer_on_the_inter_router_port_gets_no_open(start_router, config_file):
    cfg = config_file(TENANTS)
    a = start_router("--inter-router", "127.0.0.1:0", "--router-id", "A", "--config", cfg)
    port = a.ports["inter-router"]
    url = "127.0.0.1:%d" % port
    caps = [symbol("flotilla.inter-router")]
    # ANONYMOUS, a tenant's (manage-everything) credentials, and no SASL
    # layer at all: none gets an Open.
    assert refused(url, offered_capabilities=caps, allowed_mechs="ANONYMOUS") is not None
    assert refused(url, offered_capabilities=caps, user="mallory@tenant-a",
                   password="mallory-pw", allowed_mechs="PLAIN") is not None
    assert refused(url, offered_capabilities=caps, sasl_enabled=False) is not None
    got = raw_exchange(port, AMQP_HEADER)
    assert got == SASL_HEADER, got
    got = raw_exchange(port, AMQP_HEADER + b"\x00\x00\x00\x08\x02\x00\x00\x00")
    assert OPEN_CODE not in got
    a.wait_for_log(r'handshake failed.*listener="inter-router"', count=3)
    assert not any("inter-router connection open" in l for l in a.log)
    # The tenant's own traffic is untouched.
    assert round_trip(a.url, "events", "still mine", user="app@tenant-b", password="b-secret",
                      allowed_mechs="PLAIN") == "still mine"


def test_a_mesh_with_the_secret_forms_and_a_router_with_another_is_refused(start_router, tmpdir_path):
    a = start_router("--inter-router", "127.0.0.1:0", "--router-id", "A")
    peer = "127.0.0.1:%d" % a.ports["inter-router"]
    b = start_router("--router-id", "B", "--peer", peer)
    a.wait_for_log(r'mesh routes routes=\["B via B')
    wrong = os.path.join(tmpdir_path, "wrong-secret")
    with open(wrong, "w") as f:
        f.write("not-the-mesh-secret-at-all-0000")
    x = start_router("--router-id", "X", "--peer", peer, "--mesh-secret-file", wrong)
    x.wait_for_log(r"inter-router handshake failed")
    a.wait_for_log(r'handshake failed.*listener="inter-router"')
    # B's receiver gets what is sent on A; X's never does.
    # B's receiver gets what is sent on A, outcomes settled end to end; X,
    # outside the mesh, sees nothing of it.
    spy = Recv(x.url, "meshed", 1)
    rcv = Recv(b.url, "meshed", 10)
    snd = Send(a.url, "meshed", ["across %d" % i for i in range(10)],
               wait_for=lambda: rcv.link and rcv.link.state & rcv.link.REMOTE_ACTIVE)
    Scenario([spy, rcv, snd], lambda: rcv.done() and snd.done()).run()
    assert rcv.got == ["across %d" % i for i in range(10)]
    assert snd.outcomes == [Delivery.ACCEPTED] * 10
    assert spy.got == []
    assert not any("X via" in l for l in a.log if "mesh routes" in l)


def test_a_reachable_inter_router_listener_without_a_credential_does_not_start():
    p = subprocess.run(
        [flotilla_bin(), "router", "--amqp", "127.0.0.1:0", "--inter-router", "0.0.0.0:0"],
        capture_output=True, text=True, timeout=20,
    )
    assert p.returncode == 64, p.stderr
    assert "--mesh-secret-file" in p.stderr and "--tls-ca" in p.stderr, p.stderr


def test_a_broker_without_the_component_credential_does_not_start(tmpdir_path):
    p = subprocess.run(
        [flotilla_bin(), "broker", "--amqp", "127.0.0.1:0", "--data-dir", tmpdir_path,
         "--router", "127.0.0.1:5672"],
        capture_output=True, text=True, timeout=20,
    )
    assert p.returncode == 64, p.stderr
    assert "--mesh-secret-file" in p.stderr, p.stderr


def test_tenants_cannot_pose_as_a_broker(start_router, start_broker, tmpdir_path, config_file):
    cfg = config_file(TENANTS)
    r = start_router("--config", cfg)
    start_broker(os.path.join(tmpdir_path, "data"), "--config", cfg, "--router", r.url)
    r.wait_for_log(BROKER_UP)
    caps = [symbol("flotilla.route-container")]
    # A tenant allowed to manage everything in its space, with container
    # ids that might win placement; and an anonymous loopback client.
    for cid in ("broker-0", "flotilla-broker", "zzzzzz", "aaaaaa"):
        why = refused(r.url, offered_capabilities=caps, container_id=cid,
                      user="mallory@tenant-a", password="mallory-pw", allowed_mechs="PLAIN")
        assert why and "unauthorized-access" in why, why
    why = refused(r.url, offered_capabilities=caps, container_id="aaaaaa")
    assert why and "unauthorized-access" in why, why
    r.wait_for_log(r"route container refused: not a component", count=5)
    # Both tenants' queues still work, each with its own messages.
    for space, pw in (("tenant-a", "a-secret"), ("tenant-b", "b-secret")):
        assert round_trip(r.url, "orders", "for " + space, user="app@" + space, password=pw,
                          allowed_mechs="PLAIN") == "for " + space


JOBS = """
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: jobs}
spec: {address: jobs, type: queue}
"""


def test_a_broker_with_the_credential_serves_directly_through_a_router_and_across_a_mesh(
        start_router, start_broker, tmpdir_path, config_file):
    cfg = config_file(JOBS)
    a = start_router("--inter-router", "127.0.0.1:0", "--router-id", "A", "--config", cfg)
    b = start_router("--router-id", "B", "--peer", "127.0.0.1:%d" % a.ports["inter-router"], "--config", cfg)
    broker = start_broker(os.path.join(tmpdir_path, "data"), "--router", a.url, "--config", cfg)
    a.wait_for_log(BROKER_UP)
    b.wait_for_log(r'mesh routes routes=\["A via A')
    # Through the far router (link-routed across the mesh; B learns where
    # the broker is from A's records), the near one, and directly.
    wait_until("B to route to the broker", lambda: send_ok(b.url, "jobs", "via mesh"))
    assert send_ok(a.url, "jobs", "via router")
    assert send_ok(broker.url, "jobs", "direct")
    c = connect(broker.url)
    rcv = c.create_receiver("jobs", credit=3)
    got = [rcv.receive(timeout=TIMEOUT).body for _ in range(3)]
    rcv.accept()
    c.close()
    assert got == ["via mesh", "via router", "direct"]


def send_ok(url, address, body):
    try:
        c = connect(url)
        c.create_sender(address).send(Message(body=body))
        c.close()
        return True
    except (LinkDetached, ConnectionException, SendException):
        return False


@pytest.mark.parametrize("mech", ["PLAIN", "ANONYMOUS"])
def test_the_space_is_chosen_by_virtual_host_and_a_password_opens_only_its_own(start_router, config_file, mech):
    cfg = config_file(TENANTS + """
---
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: open-c}
spec: {authentication: {anonymous: true}}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: inbox}
spec: {addressSpace: open-c, address: inbox, type: anycast}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: inbox}
spec: {addressSpace: tenant-a, address: inbox, type: anycast}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: inbox}
spec: {addressSpace: tenant-b, address: inbox, type: anycast}
""")
    r = start_router("--config", cfg)
    if mech == "ANONYMOUS":
        # An anonymous client lands in the space its virtual host names,
        # and only one that admits anonymous clients.
        assert round_trip(r.url, "inbox", "anon", virtual_host="open-c", allowed_mechs="ANONYMOUS") == "anon"
        assert refused(r.url, virtual_host="tenant-a", allowed_mechs="ANONYMOUS") is not None
        return
    # `app` exists in both tenants with different passwords.
    assert round_trip(r.url, "inbox", "in a", user="app", password="a-secret",
                      virtual_host="tenant-a", allowed_mechs="PLAIN") == "in a"
    assert round_trip(r.url, "inbox", "in b", user="app", password="b-secret",
                      virtual_host="tenant-b", allowed_mechs="PLAIN") == "in b"
    # A's password never opens B, however B is named.
    assert refused(r.url, user="app", password="a-secret", virtual_host="tenant-b", allowed_mechs="PLAIN")
    assert refused(r.url, user="app@tenant-a", password="a-secret", virtual_host="tenant-b", allowed_mechs="PLAIN")
    assert refused(r.url, user="app@tenant-b", password="a-secret", allowed_mechs="PLAIN")
    # Nothing names a space: `default`, which has no `app`.
    assert refused(r.url, user="app", password="a-secret", allowed_mechs="PLAIN")
    # Same address, two spaces: a receiver in B never sees A's messages.
    cb = connect(r.url, user="app", password="b-secret", virtual_host="tenant-b", allowed_mechs="PLAIN")
    rb = cb.create_receiver("inbox", credit=5)
    ca = connect(r.url, user="app", password="a-secret", virtual_host="tenant-a", allowed_mechs="PLAIN")
    ra = ca.create_receiver("inbox", credit=5)
    ca.create_sender("inbox", options=AtMostOnce()).send(Message(body="only a"))
    cb.create_sender("inbox", options=AtMostOnce()).send(Message(body="only b"))
    assert ra.receive(timeout=TIMEOUT).body == "only a"
    assert rb.receive(timeout=TIMEOUT).body == "only b"
    ca.close()
    cb.close()


def test_require_tls_refuses_plain_tcp_and_accepts_tls(start_router, config_file, tmpdir_path):
    ca, cert, key = make_certs(tmpdir_path)
    cfg = config_file("""
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: secure}
spec: {authentication: {anonymous: false}, requireTls: true}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: orders}
spec: {addressSpace: secure, address: orders, type: anycast}
---
apiVersion: flotilla.dev/v1
kind: MessagingUser
metadata: {name: u}
spec:
  addressSpace: secure
  username: u
  password: u-secret
  authorization: [{addresses: ["#"], operations: [send, recv]}]
""")
    r = start_router("--config", cfg, "--amqps", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key)
    why = refused(r.url, user="u", password="u-secret", virtual_host="secure",
                  allowed_mechs="PLAIN", allow_insecure_mechs=True)
    assert why is not None
    r.wait_for_log(r"requires TLS")
    # Refused before the password was looked at: a wrong one says the same.
    refused(r.url, user="u", password="wrong", virtual_host="secure", allowed_mechs="PLAIN",
            allow_insecure_mechs=True)
    r.wait_for_log(r"requires TLS", count=2)
    assert not any("wrong password" in l for l in r.log)
    domain = SSLDomain(SSLDomain.MODE_CLIENT)
    domain.set_trusted_ca_db(ca)
    domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
    for port in (r.ports["amqps"], r.ports["amqp"]):
        # amqps, and TLS on the plain port.
        # (The certificate is checked against `sni`, not the virtual host.)
        assert round_trip("amqps://localhost:%d" % port, "orders", "sealed", ssl_domain=domain,
                          sni="localhost", user="u", password="u-secret", virtual_host="secure",
                          allowed_mechs="PLAIN") == "sealed"


def test_require_tls_router_wide(start_router, config_file, tmpdir_path):
    ca, cert, key = make_certs(tmpdir_path)
    r = start_router("--tls-cert", cert, "--tls-key", key, "--require-tls")
    assert refused(r.url) is not None
    domain = SSLDomain(SSLDomain.MODE_CLIENT)
    domain.set_trusted_ca_db(ca)
    domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
    assert round_trip("amqps://localhost:%d" % r.ports["amqp"], "q", "tls", ssl_domain=domain) == "tls"


def test_retiring_a_broker_moves_its_addresses(start_router, start_broker, tmpdir_path):
    console = Console(os.path.join(tmpdir_path, "console"))
    try:
        r = start_router(*console.follow_args())
        b1 = start_broker(os.path.join(tmpdir_path, "b1"), "--router", r.url, "--container-id", "b1",
                          *console.follow_args())
        wait_until("b1 registered", lambda: any(
            b["metadata"]["name"] == "b1" and b["status"]["phase"] == "Ready"
            for b in console.expect("GET", "/api/v1/brokers")["items"]))
        console.expect("POST", "/api/v1/addressspaces/default/addresses", {
            "metadata": {"name": "jobs"}, "spec": {"address": "jobs", "type": "queue"}}, status=201)
        placed = lambda: console.expect("GET", "/api/v1/addressspaces/default/addresses/jobs")["status"].get("broker")
        assert placed() == "b1"
        wait_until("the router to follow", lambda: round_trip_ok(r.url, "jobs"))
        # A running broker is not retired.
        console.expect("DELETE", "/api/v1/brokers/b1", status=409)
        # A second broker joining does not take b1's queue.
        start_broker(os.path.join(tmpdir_path, "b2"), "--router", r.url, "--container-id", "b2",
                     *console.follow_args())
        wait_until("b2 registered", lambda: len(console.expect("GET", "/api/v1/brokers")["items"]) == 2)
        assert placed() == "b1"
        b1.stop()
        r.wait_for_log(r"broker disconnected")
        why = refused_sender(r.url, "jobs")
        assert why and "b1" in why, why
        wait_until("b1 away", lambda: console.expect("GET", "/api/v1/brokers/b1")["status"]["phase"] == "Away")
        console.expect("DELETE", "/api/v1/brokers/b1")
        assert placed() == "b2"
        wait_until("jobs to work on b2", lambda: round_trip_ok(r.url, "jobs"))
        console.expect("GET", "/api/v1/brokers/b1", status=404)
    finally:
        console.stop()


def test_a_broker_away_too_long_is_retired(start_router, start_broker, tmpdir_path):
    console = Console(os.path.join(tmpdir_path, "console"), "--retire-brokers-after", "2")
    try:
        r = start_router(*console.follow_args())
        b1 = start_broker(os.path.join(tmpdir_path, "b1"), "--router", r.url, "--container-id", "b1",
                          *console.follow_args())
        wait_until("b1 registered", lambda: console.expect("GET", "/api/v1/brokers")["items"])
        console.expect("POST", "/api/v1/addressspaces/default/addresses", {
            "metadata": {"name": "jobs"}, "spec": {"address": "jobs", "type": "queue"}}, status=201)
        start_broker(os.path.join(tmpdir_path, "b2"), "--router", r.url, "--container-id", "b2",
                     *console.follow_args())
        wait_until("b2 registered", lambda: len(console.expect("GET", "/api/v1/brokers")["items"]) == 2)
        b1.stop()
        wait_until("b1 retired", lambda: [b["metadata"]["name"] for b in
                                          console.expect("GET", "/api/v1/brokers")["items"]] == ["b2"])
        wait_until("jobs to work on b2", lambda: round_trip_ok(r.url, "jobs"))
        console.wait_for_log(r"broker retired")
    finally:
        console.stop()


def round_trip_ok(url, address):
    try:
        return round_trip(url, address, "probe") == "probe"
    except (ConnectionException, LinkDetached, SendException, Exception):
        return False


def refused_sender(url, address):
    try:
        c = connect(url)
        c.create_sender(address)
        c.close()
    except (LinkDetached, ConnectionException) as e:
        return str(e)
    return None


def test_stat_through_a_router_shows_only_the_clients_own_space(start_router, start_broker, tmpdir_path, config_file):
    """`$stat` is the router's own: no capability routes it to a broker,
    whose `$stat` would list every space's queues."""
    cfg = config_file(TENANTS)
    r = start_router("--config", cfg)
    start_broker(os.path.join(tmpdir_path, "data"), "--config", cfg, "--router", r.url)
    r.wait_for_log(BROKER_UP)
    c = connect(r.url)
    from proton.reactor import ReceiverOption

    class AsQueue(ReceiverOption):
        def apply(self, receiver):
            receiver.source.capabilities.put_object(symbol("queue"))

    rcv = c.create_receiver("$stat", credit=1, options=AsQueue())
    m = rcv.receive(timeout=TIMEOUT)  # (the body is a view into `m`)
    doc = json.loads(bytes(m.body))
    c.close()
    assert doc.get("kind") != "broker", doc
    assert all(a["space"] == "default" for a in doc["addresses"]), doc
    assert "tenant-b" not in json.dumps(doc)
