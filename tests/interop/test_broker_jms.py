"""What applications moving from ActiveMQ Artemis (JMS) expect of a
broker, tried with python-qpid-proton through a router: selectors on
queue consumers, unsubscribing a durable subscription by link name alone,
delivery counts that survive a restart, message groups, and scheduled
delivery that survives a restart.

As in test_broker.py, "not delivered" is shown by order, never by waiting."""

import os
import time

import pytest
from proton import Message, symbol
from proton.reactor import DurableSubscription, Selector
from proton.utils import LinkDetached

from conftest import TIMEOUT, connect
from test_broker import BROKER_UP, bodies, eventually, leave, mesh, modified_failed, publish, take  # noqa: F401


def test_a_queue_consumer_with_a_selector_takes_only_what_it_matches(mesh):
    r, _ = mesh()
    c = connect(r.url)
    red = c.create_receiver("orders", credit=10, options=Selector("color = 'red'"))
    msgs = [Message(body="%s %d" % (color, i), properties={"color": color}) for i, color in enumerate(["blue", "red", "blue", "red"])]
    publish(r.url, "orders", msgs)
    assert bodies(take(red, 2)) == ["red 1", "red 3"]
    # The others wait for a consumer that takes them, in order.
    rest = c.create_receiver("orders", name="rest", credit=10)
    assert bodies(take(rest, 2)) == ["blue 0", "blue 2"]
    publish(r.url, "orders", [Message(body="red marker", properties={"color": "red"})])
    assert bodies(take(red, 1)) == ["red marker"]
    with pytest.raises(LinkDetached) as e:
        c.create_receiver("orders", name="bad", options=Selector("color = = 'red'"))
    assert "invalid-field" in str(e.value)
    c.close()


def test_a_durable_subscription_is_found_and_deleted_by_its_link_name(mesh):
    r, _ = mesh()
    c = connect(r.url, container_id="jms-client")
    rcv = c.create_receiver("prices/eur", name="ticker", credit=10, options=DurableSubscription())
    leave(c, rcv)
    publish(r.url, "prices/eur", ["kept while away"])

    # JMS's unsubscribe: a receiver with no source, by link name alone.
    c = connect(r.url, container_id="jms-client")
    found = c.create_receiver(None, name="ticker", credit=0)
    assert found.link.remote_source.address == "prices/eur"
    found.close()  # a closing detach deletes the subscription
    publish(r.url, "prices/eur", ["after the unsubscribe"])
    rcv = c.create_receiver("prices/eur", name="ticker", credit=10, options=DurableSubscription())
    publish(r.url, "prices/eur", ["marker"])
    assert bodies(take(rcv, 1)) == ["marker"], "the old subscription and its messages are gone"
    rcv.close()

    with pytest.raises(LinkDetached) as e:
        c.create_receiver(None, name="never-subscribed", credit=0)
    assert "not-found" in str(e.value)
    # Another client's subscription is not found by the same link name.
    other = connect(r.url, container_id="someone-else")
    with pytest.raises(LinkDetached):
        other.create_receiver(None, name="ticker", credit=0)
    other.close()
    c.close()


def test_delivery_counts_survive_a_broker_restart(mesh):
    r, b = mesh("--max-deliveries", "3")
    publish(r.url, "orders", ["poison"])
    c = connect(r.url)
    rcv = c.create_receiver("orders", credit=0)
    for n in range(2):
        m = take(rcv, 1, settle=None)[0]
        assert (m.body, m.delivery_count) == ("poison", n)
        modified_failed(rcv)
    c.close()
    # Once the broker has the message back, a message it stores after
    # puts the count (written before) on disk too.
    eventually("the message back in its queue", lambda: b.queues()["orders"]["depth"] == 1)
    publish(r.url, "orders", ["marker"])

    b.restart()
    r.wait_for_log(BROKER_UP, count=2)
    c = connect(r.url)
    rcv = c.create_receiver("orders", credit=0)
    m = take(rcv, 1, settle=None)[0]
    assert (m.body, m.delivery_count) == ("poison", 2), "the count kept in the journal"
    modified_failed(rcv)
    assert bodies(take(rcv, 1)) == ["marker"]
    dlq = c.create_receiver("DLQ", name="dlq", credit=10)
    assert bodies(take(dlq, 1)) == ["poison"], "the third failure, across the restart, dead-letters it"
    c.close()


def test_a_message_group_goes_to_one_consumer_until_it_leaves(mesh):
    r, _ = mesh()
    publish(r.url, "orders", [Message(body="g1-0", group_id="g1"), Message(body="g2-0", group_id="g2")])
    c1 = connect(r.url)
    a = c1.create_receiver("orders", credit=0)
    assert bodies(take(a, 1, settle=None)) == ["g1-0"], "a holds g1 now"
    c2 = connect(r.url)
    b = c2.create_receiver("orders", name="b", credit=10)
    assert bodies(take(b, 1)) == ["g2-0"]
    publish(r.url, "orders", [Message(body=m, group_id=m[:2]) for m in ["g1-1", "g2-1", "g1-2", "g2-2", "g2-marker"]])
    # b has credit and a has none, yet g1's messages wait for a.
    assert bodies(take(b, 3)) == ["g2-1", "g2-2", "g2-marker"]
    # a leaves, holding g1-0 unsettled: g1 moves to b, in order.
    c1.close()
    assert bodies(take(b, 3)) == ["g1-0", "g1-1", "g1-2"]
    c2.close()


def scheduled(body, **annotations):
    return Message(body=body, annotations={symbol(k): v for k, v in annotations.items()})


def test_a_scheduled_message_waits_for_its_time_even_across_a_restart(mesh):
    r, b = mesh()
    soon = int(time.time() * 1000) + 2500
    publish(r.url, "orders", [
        scheduled("by delay", **{"x-opt-delivery-delay": 1500}),
        scheduled("at a time", **{"x-opt-delivery-time": soon}),
        "now",
    ])
    c = connect(r.url)
    rcv = c.create_receiver("orders", credit=10)
    assert bodies(take(rcv, 1)) == ["now"], "scheduled messages wait, later ones go first"
    c.close()

    # Crash before they are due: they are kept, and still wait.
    b.restart()
    r.wait_for_log(BROKER_UP, count=2)
    c = connect(r.url)
    rcv = c.create_receiver("orders", credit=10)
    got = [b for b in bodies(take(rcv, 2)) if b != "now"]
    if len(got) < 2:
        # "now" was taken, but its acknowledgement (not waited for) may
        # have died with the broker: delivered again, at least once.
        got += bodies(take(rcv, 2 - len(got)))
    assert got == ["by delay", "at a time"]
    assert time.time() * 1000 >= soon, "not delivered before its delivery time"
    assert b.queues()["orders"]["scheduled"] == 0
    c.close()


USERS = """
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: jms}
spec: {authentication: {anonymous: false}}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: feed}
spec: {addressSpace: jms, address: "feed/#", type: topic}
---
apiVersion: flotilla.dev/v1
kind: MessagingUser
metadata: {name: alice}
spec:
  addressSpace: jms
  username: alice
  password: alice-pw
  authorization: [{addresses: ["feed/#"], operations: [send, recv]}]
---
apiVersion: flotilla.dev/v1
kind: MessagingUser
metadata: {name: mallory}
spec:
  addressSpace: jms
  username: mallory
  password: mallory-pw
  authorization: [{addresses: ["feed/#"], operations: [send]}]
"""


def test_a_user_without_recv_cannot_find_or_delete_a_subscription_by_name(start_router, start_broker, tmpdir_path, config_file):
    cfg = config_file(USERS)
    r = start_router("--config", cfg)
    start_broker(os.path.join(tmpdir_path, "data"), "--config", cfg, "--router", r.url)
    r.wait_for_log(BROKER_UP)
    as_user = lambda u: connect(r.url, user=u, password=u + "-pw", virtual_host="jms",  # noqa: E731
                                allowed_mechs="PLAIN", container_id="same-client")
    c = as_user("alice")
    rcv = c.create_receiver("feed/a", name="ticker", credit=10, options=DurableSubscription())
    leave(c, rcv)
    # Same container id and link name, but no right to receive from the topic.
    m = as_user("mallory")
    with pytest.raises(LinkDetached) as e:
        m.create_receiver(None, name="ticker", credit=0)
    assert "not-found" in str(e.value)
    m.create_sender("feed/a").send(Message(body="still subscribed"))
    m.close()
    c = as_user("alice")
    rcv = c.create_receiver("feed/a", name="ticker", credit=10, options=DurableSubscription())
    assert bodies(take(rcv, 1)) == ["still subscribed"]
    c.close()
