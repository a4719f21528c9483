"""Per-address policies (an Address's `spec.policy`, over its space's
`addressDefaults`, over its plan's): dead-letter and expiry addresses,
max-deliveries, a default TTL, and a queue's limits with what happens when
it is full. Tried with python-qpid-proton through a router, on a space of
their own."""

import json
import os
import subprocess

import pytest
from proton import Delivery, Message
from proton.handlers import MessagingHandler
from proton.reactor import Container
from proton.utils import SendException

from conftest import connect, flotilla_bin
from test_broker import BROKER_UP, bodies, eventually, modified_failed, take

CONFIG = """
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: shop}
spec:
  authentication: {anonymous: true}
  addressDefaults: {maxDepth: 2}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: small}
spec: {addressSpace: shop, address: small, type: queue}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: bigger}
spec: {addressSpace: shop, address: bigger, type: queue, policy: {maxDepth: 4}}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: ring}
spec: {addressSpace: shop, address: ring, type: queue, policy: {maxDepth: 3, overflow: dropOldest}}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: jobs}
spec:
  addressSpace: shop
  address: jobs
  type: queue
  policy: {deadLetterAddress: jobs-failed, maxDeliveries: 1, expiryAddress: jobs-expired, defaultTtlMs: 200, maxDepth: 100}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: jobs-failed}
spec: {addressSpace: shop, address: jobs-failed, type: queue, policy: {maxDepth: 100}}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: jobs-expired}
spec: {addressSpace: shop, address: jobs-expired, type: queue, policy: {maxDepth: 100}}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: feed}
spec: {addressSpace: shop, address: "feed/#", type: topic, policy: {maxDepth: 2}}
"""


@pytest.fixture
def shop(start_router, start_broker, tmpdir_path, config_file):
    cfg = config_file(CONFIG)
    r = start_router("--config", cfg)
    b = start_broker(os.path.join(tmpdir_path, "data"), "--config", cfg, "--router", r.url)
    r.wait_for_log(BROKER_UP)
    return r, b


def queues(broker):
    """The shop space's queues on the broker, by address."""
    out = subprocess.run(
        [flotilla_bin(), "stat", "--url", "amqp://" + broker.url, "--space", "shop", "--json"],
        capture_output=True, text=True, timeout=20, check=True,
    ).stdout
    return {q["address"]: q for q in json.loads(out)["queues"]}


def outcomes(url, address, bodies_):
    """Sends each body and returns what became of it: "accepted", or the
    rejection's condition."""
    c = connect(url, virtual_host="shop")
    s = c.create_sender(address)
    got = []
    for b in bodies_:
        try:
            s.send(b if isinstance(b, Message) else Message(body=b))
            got.append("accepted")
        except SendException as e:
            assert e.state == Delivery.REJECTED, e.state
            got.append("rejected")
    c.close()
    return got


def receiver(url, address, **kw):
    c = connect(url, virtual_host="shop")
    return c, c.create_receiver(address, **kw)


def test_a_full_queue_refuses_new_messages_and_takes_them_again_once_drained(shop):
    shop, broker = shop
    # `small` has no policy of its own: the space's default maxDepth 2.
    assert outcomes(shop.url, "small", ["a", "b", "c"]) == ["accepted", "accepted", "rejected"]
    # `bigger` overrides it.
    assert outcomes(shop.url, "bigger", ["a", "b", "c", "d", "e"]) == ["accepted"] * 4 + ["rejected"]
    c, rcv = receiver(shop.url, "small", credit=10)
    assert bodies(take(rcv, 2)) == ["a", "b"]
    c.close()  # its acceptances go out first
    eventually("the accepted messages gone", lambda: queues(broker)["small"]["unsettled"] == 0)
    assert outcomes(shop.url, "small", ["after"]) == ["accepted"]
    c, rcv = receiver(shop.url, "small", credit=10)
    assert bodies(take(rcv, 1)) == ["after"]
    c.close()


class Conditions(MessagingHandler):
    """Sends `n` messages and records each outcome's error condition."""

    def __init__(self, url, address, n):
        super().__init__()
        self.url, self.address, self.n, self.sent, self.got = url, address, n, 0, []

    def on_start(self, event):
        self.conn = event.container.connect(self.url, virtual_host="shop")
        event.container.create_sender(self.conn, self.address)

    def on_sendable(self, event):
        while self.sent < self.n and event.sender.credit > 0:
            event.sender.send(Message(body=str(self.sent)))
            self.sent += 1

    def on_settled(self, event):
        cond = event.delivery.remote.condition
        self.got.append(cond.name if cond else None)
        if len(self.got) == self.n:
            self.conn.close()


def test_the_rejection_says_resource_limit_exceeded(shop):
    shop, _ = shop
    h = Conditions(shop.url, "small", 3)
    Container(h).run()
    # The refusal comes at once, the acceptances after the journal's sync.
    assert sorted(h.got, key=str) == [None, None, "amqp:resource-limit-exceeded"]


def test_a_full_queue_with_drop_oldest_keeps_the_newest(shop):
    shop, _ = shop
    assert outcomes(shop.url, "ring", ["m%d" % i for i in range(5)]) == ["accepted"] * 5
    c, rcv = receiver(shop.url, "ring", credit=10)
    assert bodies(take(rcv, 3)) == ["m2", "m3", "m4"]
    c.close()


def test_an_address_dead_letters_and_expires_to_its_own_addresses(shop):
    shop, _ = shop
    c, rcv = receiver(shop.url, "jobs", credit=0)
    outcomes(shop.url, "jobs", [Message(body="fails", ttl=60)])
    m = take(rcv, 1, settle=None)[0]
    assert m.body == "fails"
    modified_failed(rcv)  # maxDeliveries 1: straight to jobs-failed
    failed = c.create_receiver("jobs-failed", name="failed", credit=10)
    assert bodies(take(failed, 1)) == ["fails"]
    # No TTL of its own: the address's default (200 ms), then to jobs-expired.
    outcomes(shop.url, "jobs", ["stale"])
    expired = c.create_receiver("jobs-expired", name="expired", credit=10)
    assert bodies(take(expired, 1)) == ["stale"]
    c.close()


def test_a_full_topic_subscription_refuses_for_all(shop):
    shop, _ = shop
    c, sub = receiver(shop.url, "feed/a", name="slow", credit=0)
    assert outcomes(shop.url, "feed/a", ["1", "2", "3"]) == ["accepted", "accepted", "rejected"]
    assert bodies(take(sub, 2)) == ["1", "2"]
    assert outcomes(shop.url, "feed/a", ["4"]) == ["accepted"]
    c.close()
