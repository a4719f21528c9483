"""Interop with python-qpid-proton (C Proton underneath): clients nobody on
this team wrote, talking to the real router binary."""

import os
import subprocess

import pytest
from proton import Message, SSLDomain, Delivery
from proton.handlers import MessagingHandler
from proton.reactor import AtMostOnce, DynamicNodeProperties
from proton import ConnectionException, Timeout
from proton.utils import SendException, LinkDetached

from conftest import TIMEOUT, Scenario, connect, make_certs

CONFIG = """
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: prices}
spec: {address: prices, type: multicast}
---
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: tenant-a}
spec: {authentication: {anonymous: false}}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: orders}
spec: {addressSpace: tenant-a, address: orders, type: anycast}
---
apiVersion: flotilla.dev/v1
kind: MessagingUser
metadata: {name: alice}
spec:
  addressSpace: tenant-a
  username: alice
  password: wonderland
  authorization: [{addresses: ["orders"], operations: [send, recv]}]
"""


def receive_n(receiver, n):
    got = []
    for _ in range(n):
        m = receiver.receive(timeout=TIMEOUT)
        if receiver.fetcher.unsettled:
            receiver.accept()
        got.append(m.body)
    return got


class Part(MessagingHandler):
    """One connection of a scenario run by `run`: the connection's events
    come to this handler only."""

    def __init__(self, url, address, credit=0):
        super().__init__(prefetch=credit, auto_accept=False)
        self.url, self.address, self.link = url, address, None

    def start(self, container):
        self.conn = container.connect(self.url, handler=self)
        self.attach(container)

    def mine(self, event):
        return event.link is not None and self.link is not None and event.link == self.link

    def done(self):
        return True

    def tick(self):
        """Called every 50 ms by the scenario."""


class Recv(Part):
    """Receives `n` messages (or until told to stop), settling each with
    `outcome` ('accept' or 'reject')."""

    def __init__(self, url, address, n, credit=10, outcome="accept", dynamic=False):
        super().__init__(url, address, credit)
        self.n, self.outcome, self.dynamic = n, outcome, dynamic
        self.got = []

    def attach(self, container):
        self.link = container.create_receiver(self.conn, self.address, dynamic=self.dynamic)

    def on_message(self, event):
        if not self.mine(event):
            return
        self.got.append(event.message.body)
        if not event.delivery.settled:
            if self.outcome == "reject":
                self.reject(event.delivery)
            else:
                self.accept(event.delivery)

    def done(self):
        return len(self.got) >= self.n


class Send(Part):
    """Sends `bodies` as credit allows and records each outcome."""

    def __init__(self, url, address, bodies, presettled=False, wait_for=None):
        super().__init__(url, address)
        self.bodies, self.presettled, self.wait_for = list(bodies), presettled, wait_for
        self.sent, self.outcomes = 0, []

    def attach(self, container):
        opts = AtMostOnce() if self.presettled else None
        self.link = container.create_sender(self.conn, self.address, options=opts)

    def on_sendable(self, event):
        if self.mine(event):
            self.tick()

    def tick(self):
        # Credit may come before `wait_for` holds; the scenario's timer retries.
        if self.link is None or (self.wait_for and not self.wait_for()):
            return
        while self.sent < len(self.bodies) and self.link.credit > 0:
            self.link.send(Message(body=self.bodies[self.sent]))
            self.sent += 1

    def on_settled(self, event):
        if self.mine(event):
            self.outcomes.append(event.delivery.remote_state)

    def done(self):
        if self.presettled:
            return self.sent == len(self.bodies)
        return len(self.outcomes) == len(self.bodies)


def run(*parts):
    """Runs `parts` until all are done; fails if that takes longer than
    TIMEOUT."""
    s = Scenario(parts, lambda: all(p.done() for p in parts)).run()
    assert not s.timed_out, "scenario timed out: %r" % [(type(p).__name__, p.done()) for p in parts]
    return parts


@pytest.mark.parametrize("presettled", [False, True])
def test_send_receive(router, presettled):
    bodies = ["hello %d" % i for i in range(20)]
    rcv, snd = run(Recv(router.url, "greetings", 20), Send(router.url, "greetings", bodies, presettled))
    assert rcv.got == bodies
    if not presettled:
        assert snd.outcomes == [Delivery.ACCEPTED] * 20


def test_two_receivers_share_anycast_exactly(router):
    total = 40
    r1, r2 = Recv(router.url, "work", total, credit=5), Recv(router.url, "work", total, credit=5)
    # Start sending once both receivers are attached.
    snd = Send(router.url, "work", range(total), wait_for=lambda: r1.link and r2.link and r1.link.state & r1.link.REMOTE_ACTIVE and r2.link.state & r2.link.REMOTE_ACTIVE)
    r1.n = r2.n = 0  # done is judged by the sender's outcomes
    run(r1, r2, snd)
    assert snd.outcomes == [Delivery.ACCEPTED] * total
    assert r1.got and r2.got, "both receivers got messages: %r %r" % (r1.got, r2.got)
    assert sorted(r1.got + r2.got) == list(range(total))


def test_sender_gets_no_credit_until_a_receiver_attaches(router):
    c = connect(router.url)
    snd = c.create_sender("lonely")
    assert snd.link.credit == 0
    c2 = connect(router.url)
    rcv = c2.create_receiver("lonely", credit=10)
    c.wait(lambda: snd.link.credit > 0, timeout=TIMEOUT, msg="credit after a receiver attached")
    c.close()
    c2.close()


def test_rejected_reaches_the_sender(router):
    rcv = Recv(router.url, "picky", 1, outcome="reject")
    snd = Send(router.url, "picky", ["not for me"], wait_for=lambda: rcv.link and rcv.link.state & rcv.link.REMOTE_ACTIVE)
    run(rcv, snd)
    assert snd.outcomes == [Delivery.REJECTED]


def test_multicast_fan_out_to_three_receivers(start_router, config_file):
    r = start_router("--config", config_file(CONFIG))
    receivers = [Recv(r.url, "prices", 10, credit=100) for _ in range(3)]
    attached = lambda: all(x.link and x.link.state & x.link.REMOTE_ACTIVE for x in receivers)
    snd = Send(r.url, "prices", range(10), wait_for=attached)
    run(*receivers, snd)
    for x in receivers:
        assert x.got == list(range(10))


class Server(Part):
    """The proton examples' server: answers each request on its reply-to
    through one anonymous-relay sender."""

    def __init__(self, url, address):
        super().__init__(url, address, credit=10)
        self.relay = None

    def attach(self, container):
        self.link = container.create_receiver(self.conn, self.address)
        self.relay = container.create_sender(self.conn, None)

    def on_message(self, event):
        if self.mine(event):
            m = event.message
            self.relay.send(Message(address=m.reply_to, body=m.body.upper(), correlation_id=m.correlation_id))
            self.accept(event.delivery)


class Client(Part):
    """The proton examples' client: a dynamic receiver for replies, requests
    sent with reply-to set to its address."""

    def __init__(self, url, address, requests, server):
        super().__init__(url, address, credit=10)
        self.requests, self.server, self.replies, self.reply_to, self.sender = requests, server, [], None, None

    def attach(self, container):
        self.link = container.create_receiver(self.conn, None, dynamic=True)

    def on_link_opened(self, event):
        if self.mine(event):
            self.reply_to = self.link.remote_source.address
            self.sender = event.container.create_sender(self.conn, self.address)

    def on_sendable(self, event):
        if self.sender is not None and event.link == self.sender:
            self.tick()

    def tick(self):
        # Requests wait until the server listens (the scenario retries).
        if self.sender is None or not self.server.link.state & self.server.link.REMOTE_ACTIVE:
            return
        while self.requests and self.sender.credit > 0:
            self.sender.send(Message(body=self.requests.pop(0), reply_to=self.reply_to))

    def on_message(self, event):
        if self.mine(event):
            self.replies.append(event.message.body)
            self.accept(event.delivery)

    def done(self):
        return len(self.replies) == 3


def test_request_reply_with_dynamic_addresses_and_anonymous_relay(router):
    server = Server(router.url, "service")
    a = Client(router.url, "service", ["a-%d" % i for i in range(3)], server)
    b = Client(router.url, "service", ["b-%d" % i for i in range(3)], server)
    run(server, a, b)
    assert a.reply_to and b.reply_to and a.reply_to != b.reply_to
    assert a.replies == ["A-%d" % i for i in range(3)]
    assert b.replies == ["B-%d" % i for i in range(3)]


def test_plain_authentication(start_router, config_file):
    r = start_router("--config", config_file(CONFIG))
    with pytest.raises(ConnectionException):
        connect(r.url, user="alice@tenant-a", password="wrong", allowed_mechs="PLAIN")
    c = connect(r.url, user="alice@tenant-a", password="wonderland", allowed_mechs="PLAIN")
    rcv = c.create_receiver("orders", credit=5)
    snd = c.create_sender("orders", options=AtMostOnce())
    snd.send(Message(body="tenant order"))
    assert receive_n(rcv, 1) == ["tenant order"]
    # Outside the user's rules: refused.
    with pytest.raises(LinkDetached) as e:
        c.create_sender("secrets")
    assert "unauthorized-access" in str(e.value)
    c.close()


def test_tls_connection(start_router, tmpdir_path):
    ca, cert, key = make_certs(tmpdir_path)
    r = start_router("--amqps", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key)
    domain = SSLDomain(SSLDomain.MODE_CLIENT)
    domain.set_trusted_ca_db(ca)
    domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
    c = connect("amqps://localhost:%d" % r.ports["amqps"], ssl_domain=domain)
    rcv = c.create_receiver("secure", credit=5)
    snd = c.create_sender("secure", options=AtMostOnce())
    snd.send(Message(body="over tls"))
    assert receive_n(rcv, 1) == ["over tls"]
    c.close()


def test_clients_on_different_routers_of_a_mesh(start_router):
    a = start_router("--inter-router", "127.0.0.1:0", "--router-id", "A")
    b = start_router("--router-id", "B", "--peer", "127.0.0.1:%d" % a.ports["inter-router"])
    a.wait_for_log(r'mesh routes routes=\["B via B')
    bodies = ["across %d" % i for i in range(10)]
    rcv = Recv(b.url, "meshed", 10)
    # The sender's credit comes once A has learnt of the receiver on B.
    snd = Send(a.url, "meshed", bodies, wait_for=lambda: rcv.link and rcv.link.state & rcv.link.REMOTE_ACTIVE)
    run(rcv, snd)
    assert rcv.got == bodies
    assert snd.outcomes == [Delivery.ACCEPTED] * 10


def test_broker_queue_keeps_messages_for_a_later_consumer(broker):
    """Store and forward: sent before any consumer exists, accepted once
    stored, received later, in order."""
    bodies = ["stored %d" % i for i in range(10)]
    snd = Send(broker.url, "queue-a", bodies)
    run(snd)
    assert snd.outcomes == [Delivery.ACCEPTED] * 10
    later = Recv(broker.url, "queue-a", 10, credit=10)
    run(later)
    assert later.got == bodies
