"""The control plane end to end with python-qpid-proton (issue 5): a space,
a user and an address made through the console's REST API (urllib); a
router following the console (`--console`); proton clients connecting as
that user. Things the router applies from the watch asynchronously are
polled (a login or an attach retried) within TIMEOUT."""

import time

import pytest
from proton import ConnectionException, Endpoint, Message
from proton.reactor import AtMostOnce
from proton.utils import ConnectionClosed, LinkDetached

from conftest import TIMEOUT, connect

# SCRAM-SHA-256 where proton has Cyrus SASL, else PLAIN (built in).
MECHS = "SCRAM-SHA-256 PLAIN"


def create_space(console, name):
    console.expect("POST", "/api/v1/addressspaces",
                   {"metadata": {"name": name}, "spec": {"authentication": {"anonymous": False}}}, 201)


def create_address(console, space, name, address, kind="anycast"):
    console.expect("POST", "/api/v1/addressspaces/%s/addresses" % space,
                   {"metadata": {"name": name}, "spec": {"address": address, "type": kind}}, 201)


def create_user(console, space, name, password, addresses):
    user = console.expect("POST", "/api/v1/addressspaces/%s/users" % space, {
        "metadata": {"name": name},
        "spec": {
            "username": name,
            "password": password,
            "authorization": [{"addresses": addresses, "operations": ["send", "recv"]}],
        },
    }, 201)
    assert "password" not in user["spec"] and "scramSha256" not in user["spec"], user


def until(what, attempt):
    """Calls `attempt` until it returns something other than None, within
    TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        got = attempt()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.02)


def login(router, user, password):
    """A connection as `user`, once the router has heard of the user."""
    def attempt():
        try:
            return connect(router.url, user=user, password=password, allowed_mechs=MECHS)
        except ConnectionException:
            return None
    return until(user + " to log in", attempt)


def when_known(create, address):
    """`create(address)` (a sender or receiver), retried while the router
    does not know the address yet (amqp:not-found)."""
    def attempt():
        try:
            return create(address)
        except LinkDetached as e:
            if e.condition == "amqp:not-found":
                return None
            raise
    return until("the address %r" % address, attempt)


def receive_one(receiver):
    m = receiver.receive(timeout=TIMEOUT)
    if receiver.fetcher.unsettled:
        receiver.accept()
    return m.body


def refused(create, address):
    """The condition of a refused attach."""
    with pytest.raises(LinkDetached) as e:
        create(address)
    return e.value.condition


@pytest.fixture
def tenants(console, start_router):
    """Two spaces, each with its own `orders` and `shared`; alice (tenant-a)
    may use `orders` and `shared`; `secret` in tenant-a is not hers; bob
    (tenant-b) may use `orders` and `shared`. Returns the router."""
    router = start_router(*console.follow_args())
    router.wait_for_log("following the console")
    for space in ("tenant-a", "tenant-b"):
        create_space(console, space)
        create_address(console, space, "orders", "orders")
        create_address(console, space, "shared", "shared")
    create_address(console, "tenant-a", "secret", "secret")
    create_user(console, "tenant-a", "alice", "wonderland", ["orders", "shared"])
    create_user(console, "tenant-b", "bob", "builder", ["orders", "shared"])
    return router


def presettled(connection):
    """`create(address)` of an at-most-once sender on `connection`. The
    tests send and receive on one blocking connection: an unsettled
    blocking send waits for the receiver's outcome (relayed end to end),
    and a presettled one is only written out while its connection is
    processed, so across two blocking connections of one thread neither
    would arrive."""
    return lambda address: connection.create_sender(address, options=AtMostOnce())


def test_a_user_made_through_the_api_sends_and_receives(tenants):
    c = login(tenants, "alice@tenant-a", "wonderland")
    rcv = when_known(lambda a: c.create_receiver(a, credit=10), "orders")
    snd = when_known(presettled(c), "orders")
    for i in range(3):
        snd.send(Message(body="order %d" % i))
    assert [receive_one(rcv) for _ in range(3)] == ["order 0", "order 1", "order 2"]
    with pytest.raises(ConnectionException):
        connect(tenants.url, user="alice@tenant-a", password="looking-glass", allowed_mechs=MECHS)
    c.close()


def test_a_second_space_with_the_same_address_sees_nothing_of_the_first(tenants):
    alice = login(tenants, "alice@tenant-a", "wonderland")
    bob = login(tenants, "bob@tenant-b", "builder")
    a_rcv = when_known(lambda a: alice.create_receiver(a, credit=10), "orders")
    b_rcv = when_known(lambda a: bob.create_receiver(a, credit=10), "orders")
    a_snd = when_known(presettled(alice), "orders")
    for i in range(3):
        a_snd.send(Message(body="a-%d" % i))
    assert [receive_one(a_rcv) for _ in range(3)] == ["a-0", "a-1", "a-2"]
    # Anything of tenant-a's that reached bob would come before his own.
    when_known(presettled(bob), "orders").send(Message(body="for b"))
    assert receive_one(b_rcv) == "for b", "bob's first message is bob's own"

    # Only tenant-b has a receiver for `shared`: tenant-a's sender gets no
    # credit. (A refused attach is a round trip: credit would come first.)
    when_known(lambda a: bob.create_receiver(a, credit=10), "shared")
    shared = when_known(alice.create_sender, "shared")
    assert refused(alice.create_sender, "secret") == "amqp:unauthorized-access"
    assert shared.link.credit == 0, "a receiver in tenant-b gave credit to tenant-a"
    alice.close()
    bob.close()


def test_the_user_cannot_attach_outside_its_rules(tenants):
    alice = login(tenants, "alice@tenant-a", "wonderland")
    when_known(alice.create_sender, "orders")
    # `secret` exists in tenant-a; `elsewhere` does not: both refused.
    assert refused(alice.create_sender, "secret") == "amqp:unauthorized-access"
    assert refused(lambda a: alice.create_receiver(a, credit=1), "secret") == "amqp:unauthorized-access"
    assert refused(alice.create_sender, "elsewhere") == "amqp:unauthorized-access"
    # bob's address names are his space's, not a way into tenant-a.
    bob = login(tenants, "bob@tenant-b", "builder")
    assert refused(bob.create_sender, "secret") == "amqp:unauthorized-access"
    alice.close()
    bob.close()


def test_deleting_the_address_detaches_the_link(console, tenants):
    c = login(tenants, "alice@tenant-a", "wonderland")
    rcv = when_known(lambda a: c.create_receiver(a, credit=10), "orders")
    snd = when_known(presettled(c), "orders")
    snd.send(Message(body="before"))
    assert receive_one(rcv) == "before"
    # tenant-b's `orders` is another address: it stays.
    bob = login(tenants, "bob@tenant-b", "builder")
    b_rcv = when_known(lambda a: bob.create_receiver(a, credit=10), "orders")

    console.expect("DELETE", "/api/v1/addressspaces/tenant-a/addresses/orders")
    # Both links are detached; proton raises once for each.
    both = lambda: rcv.link.state & snd.link.state & Endpoint.REMOTE_CLOSED
    errors = {}
    deadline = time.monotonic() + TIMEOUT
    while not both():
        assert time.monotonic() < deadline, "the links were not detached"
        try:
            c.wait(both, timeout=TIMEOUT)
        except LinkDetached as e:
            errors[e.link.name] = (e.condition, str(e))
    assert set(errors) == {rcv.link.name, snd.link.name}, errors
    for condition, text in errors.values():
        assert condition == "amqp:not-found", text
        assert "was deleted" in text, text
    assert refused(lambda a: c.create_receiver(a, credit=1), "orders") == "amqp:not-found"

    when_known(presettled(bob), "orders").send(Message(body="tenant-b goes on"))
    assert receive_one(b_rcv) == "tenant-b goes on"
    c.close()
    bob.close()


def test_deleting_the_user_closes_its_connection(console, tenants):
    alice = login(tenants, "alice@tenant-a", "wonderland")
    when_known(lambda a: alice.create_receiver(a, credit=10), "orders")
    console.expect("DELETE", "/api/v1/addressspaces/tenant-a/users/alice")
    with pytest.raises(ConnectionClosed) as e:
        alice.wait(lambda: alice.conn.state & Endpoint.REMOTE_CLOSED, timeout=TIMEOUT)
    assert e.value.condition == "amqp:unauthorized-access", e.value
    with pytest.raises(ConnectionException):
        connect(tenants.url, user="alice@tenant-a", password="wonderland", allowed_mechs=MECHS)


def test_the_router_keeps_the_last_configuration_without_the_console(console, tenants):
    bob = login(tenants, "bob@tenant-b", "builder")
    rcv = when_known(lambda a: bob.create_receiver(a, credit=10), "orders")
    console.stop()
    # The links up stay up.
    when_known(presettled(bob), "orders").send(Message(body="console away"))
    assert receive_one(rcv) == "console away"
    # A new connection as the user, to an address the console made.
    again = connect(tenants.url, user="bob@tenant-b", password="builder", allowed_mechs=MECHS)
    rcv2 = again.create_receiver("shared", credit=10)
    again.create_sender("shared", options=AtMostOnce()).send(Message(body="new connection"))
    assert receive_one(rcv2) == "new connection"
    again.close()
    bob.close()
