"""Local transactions (AMQP 1.0 §4.4) with python-qpid-proton's transaction
API, against the broker reached directly and through a router that routes
the coordinator link to it: what is sent under a transaction is stored
only on commit, what is accepted under one is consumed only on commit, a
rollback undoes both, and a commit the broker acknowledged survives a
kill -9.

As in test_broker.py, "not delivered" is shown by order, never by waiting:
a marker message is sent after the ones that must not arrive, and the
marker must come first."""

import os
import re
import threading

import pytest
from proton import Delivery, Endpoint, Message, Timeout
from proton.handlers import MessagingHandler

from conftest import TIMEOUT, Scenario, connect, wait_until
from test_broker import BROKER_UP, publish
from test_proton import Recv

QUEUE = "txq"
CONFIG = """
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: txq}
spec: {address: txq, type: queue}
"""
# Two brokers behind one router, and a queue each holds.
PINNED = """
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: on-b1}
spec: {address: on-b1, type: queue, broker: b1}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: on-b2}
spec: {address: on-b2, type: queue, broker: b2}
"""


@pytest.fixture
def stack(start_router, start_broker, tmpdir_path, config_file):
    """`stack(where)`: a broker on a fresh data dir, and the URL clients
    use: the broker's own ("broker"), or that of a router whose route
    container the broker is ("router"). Returns (url, broker)."""

    def start(where):
        cfg = config_file(CONFIG)
        data = os.path.join(tmpdir_path, "data")
        if where == "broker":
            b = start_broker(data, "--config", cfg)
            return b.url, b
        r = start_router("--config", cfg)
        b = start_broker(data, "--config", cfg, "--router", r.url)
        r.wait_for_log(BROKER_UP)
        return r.url, b

    return start


# ---- helpers ------------------------------------------------------------------


def outcome(delivery):
    """A delivery's remote state and condition, for a failure message."""
    cond = delivery.remote.condition
    return "%s%s" % (delivery.remote_state, " %s: %s" % (cond.name, cond.description) if cond else "")


class Client(MessagingHandler):
    """One connection of a scenario (conftest.Scenario) that records what
    went wrong on it: a link, session or connection closed with an error
    (a refused coordinator link among them), a connection lost, a refused
    declare or commit. A part with errors counts as done, so the scenario
    ends at once and the test reports them."""

    def __init__(self, url, address):
        super().__init__(prefetch=0, auto_accept=False)
        self.url, self.address = url, address
        self.conn = self.link = self.container = None
        self.errors = []

    def tick(self):
        """Called every 50 ms by the scenario."""

    def on_link_error(self, event):
        c = event.link.remote_condition
        self.errors.append("link %r closed by the peer: %s: %s" % (event.link.name, c.name, c.description))
        event.link.close()

    def on_link_remote_detach(self, event):
        # A router detaches (not closes) a client's routed links when their
        # broker goes away.
        c = event.link.remote_condition
        self.errors.append("link %r detached by the peer: %s" % (event.link.name, c.name if c else "no error"))
        event.link.detach()

    def on_session_error(self, event):
        c = event.session.remote_condition
        self.errors.append("session closed by the peer: %s: %s" % (c.name, c.description))
        event.connection.close()

    def on_connection_error(self, event):
        c = event.connection.remote_condition
        self.errors.append("connection closed by the peer: %s: %s" % (c.name, c.description))

    def on_transport_error(self, event):
        c = event.transport.condition
        self.errors.append("transport: %s: %s" % (c.name, c.description) if c else "transport error")

    def on_disconnected(self, event):
        if not event.connection.state & Endpoint.LOCAL_CLOSED:
            self.errors.append("disconnected")

    def on_transaction_declare_failed(self, event):
        self.errors.append("declare refused: " + outcome(event.delivery))

    def on_transaction_commit_failed(self, event):
        self.errors.append("commit refused: " + outcome(event.delivery))


class TxSender(Client):
    """Sends `batches` to `address` on one connection (so one session),
    each batch under a transaction of its own, as proton's tx_send example
    does: declare, send the batch as credit allows, commit it (or roll it
    back, with `abort`) right after its last transfer, without waiting for
    the broker's answers to them, declare the next once the last is
    discharged.

    Options: `marker` is sent (not under the transaction) on the same link
    right after a batch; the discharge waits until `discharge_when()`
    holds; `trailer` is sent (not under a transaction) once the last batch
    is discharged."""

    def __init__(self, url, address, batches, abort=False, marker=None, discharge_when=None, trailer=None):
        super().__init__(url, address)
        self.batches, self.abort = [list(b) for b in batches], abort
        self.marker, self.trailer = marker, trailer
        self.discharge_when = discharge_when or (lambda: True)
        self.txn, self.batch, self.sent = None, 0, 0
        self.marked = self.discharging = self.trailed = False
        self.discharged = []  # batches whose discharge went out
        self.committed, self.aborted = [], []  # batches whose discharge was answered

    def start(self, container):
        self.container = container
        self.conn = container.connect(self.url, handler=self, reconnect=False)
        self.link = container.create_sender(self.conn, self.address)
        container.declare_transaction(self.conn, handler=self)

    def on_transaction_declared(self, event):
        self.txn = event.transaction
        self.tick()

    def on_sendable(self, event):
        if event.link == self.link:
            self.tick()

    def tick(self):
        if self.errors or self.link is None:
            return
        if self.txn is not None and not self.discharging:
            bodies = self.batches[self.batch]
            while self.sent < len(bodies) and self.link.credit > 0:
                self.txn.send(self.link, Message(body=bodies[self.sent]))
                self.sent += 1
            if self.sent < len(bodies):
                return
            if self.marker is not None and not self.marked:
                if self.link.credit <= 0:
                    return
                self.link.send(Message(body=self.marker))
                self.marked = True
            if not self.discharge_when():
                return
            self.discharging = True
            self.discharged.append(self.batch)
            if self.abort:
                self.txn.abort()
            else:
                self.txn.commit()
        elif self.batch == len(self.batches) and self.trailer is not None and not self.trailed and self.link.credit > 0:
            self.link.send(Message(body=self.trailer))
            self.trailed = True

    def _next(self, answered):
        answered.append(self.batch)
        self.batch += 1
        self.txn, self.sent, self.marked, self.discharging = None, 0, False, False
        if self.batch < len(self.batches):
            self.container.declare_transaction(self.conn, handler=self)
        self.tick()

    def on_transaction_committed(self, event):
        self._next(self.committed)

    def on_transaction_aborted(self, event):
        self._next(self.aborted)

    def done(self):
        return self.batch == len(self.batches) and (self.trailer is None or self.trailed)

    def status(self):
        return "TxSender: batch %d of %d, %d of it sent, declared %s, discharging %s, committed %r, aborted %r" % (
            self.batch, len(self.batches), self.sent, self.txn is not None, self.discharging,
            self.committed, self.aborted)


class TxTaker(Client):
    """Takes `n` messages from `address` under one transaction on a
    connection of its own, as proton's tx_recv example does: credit for
    exactly `n` once the transaction is declared, each message accepted
    under it, then commit (or roll back, with `abort`). Nothing is settled
    by hand: proton releases the messages of an aborted transaction."""

    def __init__(self, url, address, n, abort=False):
        super().__init__(url, address)
        self.n, self.abort = n, abort
        self.txn, self.got, self.outcome = None, [], None

    def start(self, container):
        self.conn = container.connect(self.url, handler=self, reconnect=False)
        self.link = container.create_receiver(self.conn, self.address)
        container.declare_transaction(self.conn, handler=self)

    def on_transaction_declared(self, event):
        self.txn = event.transaction
        self.link.flow(self.n)

    def on_message(self, event):
        if event.link != self.link:
            return
        self.got.append(event.message.body)
        self.txn.accept(event.delivery)
        if len(self.got) == self.n:
            if self.abort:
                self.txn.abort()
            else:
                self.txn.commit()

    def on_transaction_committed(self, event):
        self.outcome = "committed"

    def on_transaction_aborted(self, event):
        self.outcome = "aborted"

    def done(self):
        return self.outcome is not None

    def status(self):
        return "TxTaker: declared %s, got %r, outcome %s" % (self.txn is not None, self.got, self.outcome)


def status(part):
    return part.status() if hasattr(part, "status") else "%s got %r" % (type(part).__name__, part.got)


def play(*parts, timeout=TIMEOUT):
    """Runs `parts` in one container until each is done (or one has
    errors), then closes their connections (so every settlement reached
    the peer); fails if a part has errors or if that takes longer than
    `timeout`, saying where each part was."""
    failed = lambda: any(getattr(p, "errors", None) for p in parts)  # noqa: E731
    s = Scenario(parts, lambda: failed() or all(p.done() for p in parts), timeout, close=True).run()
    errors = [e for p in parts for e in getattr(p, "errors", [])]
    assert not errors, "errors: %r; %s" % (errors, "; ".join(status(p) for p in parts))
    assert not s.timed_out, "timed out: " + "; ".join(status(p) for p in parts)
    return parts


def before_marker(url, marker="marker", limit=1000, queue=QUEUE):
    """Publishes `marker` to the queue, then takes (accepting) from a new
    receiver until it comes: what the queue held before it, in order."""
    publish(url, queue, [marker])
    c = connect(url)
    got = []
    try:
        rcv = c.create_receiver(queue, credit=100)
        while True:
            try:
                m = rcv.receive(timeout=TIMEOUT)
            except Timeout:
                raise AssertionError("the marker never came; before it: %r" % got)
            rcv.accept()
            if m.body == marker:
                return got
            got.append(m.body)
            assert len(got) <= limit, "more than %d messages before the marker: %r..." % (limit, got[:20])
    finally:
        c.close()


def empty(queue):
    """Whether a queue (as Broker.queues() reports it) holds nothing, not
    even a message delivered and not yet settled."""
    return queue["depth"] == 0 and queue["unsettled"] == 0


# ---- tests --------------------------------------------------------------------


@pytest.mark.parametrize("where", ["broker", "router"])
def test_messages_sent_in_a_transaction_arrive_on_commit_only(stack, where):
    """A consumer sees nothing of a transaction before its commit, then all
    of it, in order, once."""
    url, _ = stack(where)
    sent = ["tx %d" % i for i in range(10)]
    rcv = Recv(url, QUEUE, 12, credit=10)
    # "marker" goes plain (not in the transaction) on the same link right
    # after the ten, and the commit waits until the consumer has it: had
    # any of the ten been visible before the commit, it would come first.
    tx = TxSender(url, QUEUE, [sent], marker="marker", discharge_when=lambda: "marker" in rcv.got, trailer="end")
    play(rcv, tx)
    assert tx.committed == [0]
    assert rcv.got[:1] == ["marker"], "messages of the transaction arrived before its commit: %r" % rcv.got
    assert rcv.got == ["marker"] + sent + ["end"], "after the commit: the ten, in order, once, then end"


@pytest.mark.parametrize("where", ["broker", "router"])
def test_messages_sent_in_a_rolled_back_transaction_never_arrive(stack, where):
    """A rollback drops what was sent under the transaction; the queue goes
    on as before."""
    url, _ = stack(where)
    rcv = Recv(url, QUEUE, 1)
    tx = TxSender(url, QUEUE, [["rolled back %d" % i for i in range(10)]], abort=True, trailer="after")
    play(rcv, tx)
    assert tx.aborted == [0]
    assert rcv.got == ["after"], "rolled back messages arrived: %r" % rcv.got
    assert before_marker(url) == [], "the queue kept messages of the rolled back transaction"


@pytest.mark.parametrize("where", ["broker", "router"])
def test_messages_accepted_in_a_committed_transaction_are_gone(stack, where):
    """Accepting under a transaction, then committing, consumes the
    messages: no one gets them again, even after the consumer leaves
    without settling them."""
    url, b = stack(where)
    stored = ["stored %d" % i for i in range(5)]
    publish(url, QUEUE, stored)
    taker = TxTaker(url, QUEUE, 5)
    play(taker)
    assert (taker.got, taker.outcome) == (stored, "committed")
    assert before_marker(url) == [], "messages accepted in a committed transaction were delivered again"
    wait_until("the queue to be empty", lambda: empty(b.queues()[QUEUE]), timeout=TIMEOUT)


@pytest.mark.parametrize("where", ["broker", "router"])
def test_messages_accepted_in_a_rolled_back_transaction_come_again(stack, where):
    """A rollback undoes the acceptances: the next consumer gets every
    message again, in order, once."""
    url, _ = stack(where)
    stored = ["stored %d" % i for i in range(5)]
    publish(url, QUEUE, stored)
    taker = TxTaker(url, QUEUE, 5, abort=True)
    play(taker)
    assert (taker.got, taker.outcome) == (stored, "aborted")
    assert before_marker(url) == stored, "after the rollback: the five again, in order, once"


@pytest.mark.parametrize("where", ["broker", "router"])
def test_many_transactions_one_after_another_on_one_session(stack, where):
    """Transactions declared one after another on one session each commit
    their own messages, in order."""
    url, _ = stack(where)
    batches = [["t%d-%d" % (t, i) for i in range(3)] for t in range(20)]
    tx = TxSender(url, QUEUE, batches)
    play(tx)
    assert tx.committed == list(range(20))
    assert before_marker(url) == [m for b in batches for m in b], "each transaction's messages, in order, once"


BATCH = re.compile(r"b(\d+)-(\d+)$")


@pytest.mark.parametrize("where", ["broker", "router"])
def test_acknowledged_commits_survive_kill_9_and_none_is_half_there(start_router, start_broker, tmpdir_path, config_file, where):
    """A commit the broker acknowledged survives a crash (kill -9) in the
    middle of a stream of commits, and no transaction is ever half there:
    each is in the queue whole, in order, or not at all. Directly, and
    through a router (which routes the coordinator to the broker)."""
    cfg = config_file(CONFIG)
    r = start_router("--config", cfg) if where == "router" else None
    extra = ("--router", r.url) if r else ()
    b = start_broker(os.path.join(tmpdir_path, "data"), "--config", cfg, *extra)
    if r:
        r.wait_for_log(BROKER_UP)
    url = r.url if r else b.url
    producer = TxSender(url, QUEUE, (["b%d-%d" % (n, i) for i in range(10)] for n in range(1000)))
    s = Scenario([producer], lambda: bool(producer.errors) or producer.done(), timeout=40)
    t = threading.Thread(target=s.run, daemon=True)
    t.start()
    try:
        wait_until("30 commits acknowledged", lambda: len(producer.committed) >= 30 or producer.errors,
                   timeout=15)
        assert not producer.errors, "before the kill: %r; %s" % (producer.errors, producer.status())
        b.stop()  # kill -9, as Broker.restart() does
        t.join(TIMEOUT)
        assert not t.is_alive(), "the producer did not notice the broker was killed: " + producer.status()
    finally:
        b.stop()
        t.join(TIMEOUT)
    acked, discharged = list(producer.committed), set(producer.discharged)

    b.restart()
    if r:
        r.wait_for_log(BROKER_UP, count=2)
    got = before_marker(url, marker="end", limit=10 * (max(discharged) + 1))
    by_batch = {}
    for body in got:
        m = BATCH.match(body)
        assert m, "not from the producer: %r" % body
        by_batch.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    broken = {n: seen for n, seen in by_batch.items() if seen != list(range(10))}
    assert not broken, "batches not there whole, in order, once (batch: its messages): %r" % broken
    assert got == ["b%d-%d" % (n, i) for n in sorted(by_batch) for i in range(10)], \
        "batches out of order or interleaved: %r" % got
    assert not set(by_batch) - discharged, "never committed, yet there: %r" % sorted(set(by_batch) - discharged)
    missing = sorted(set(acked) - set(by_batch))
    assert not missing, "acknowledged commits lost: %r (of %d acknowledged)" % (missing, len(acked))


# ---- two brokers behind one router -------------------------------------------


class Steps(Client):
    """Runs transactions one after another on one connection (so one
    coordinator link): each step is (bodies by address, "commit" or
    "abort", or None to leave it open). A step's messages go out one at a time, each once the one
    before is settled, and its discharge once the last is; what each
    transfer and discharge was answered is recorded in `outcomes` and
    `results`."""

    def __init__(self, url, steps):
        super().__init__(url, None)
        self.steps, self.step, self.results = steps, 0, []
        self.txn = self.waiting = None
        self.outcomes, self.todo, self.senders = [], [], {}

    def start(self, container):
        self.container = container
        self.conn = container.connect(self.url, handler=self, reconnect=False)
        for sends, _ in self.steps:
            for address, _ in sends:
                if address not in self.senders:
                    self.senders[address] = container.create_sender(self.conn, address)
        container.declare_transaction(self.conn, handler=self)

    def on_transaction_declared(self, event):
        self.txn = event.transaction
        self.todo = [(a, b) for a, bodies in self.steps[self.step][0] for b in bodies]
        self.tick()

    def on_settled(self, event):
        if event.delivery == self.waiting:
            d = event.delivery
            cond = d.remote.condition
            self.outcomes.append((self.step, d.remote_state, cond.name if cond else None,
                                  cond.description if cond else None))
            self.waiting = None
            self.tick()

    def tick(self):
        if self.errors or self.txn is None or self.waiting is not None:
            return
        if self.todo:
            address, body = self.todo[0]
            link = self.senders[address]
            if link.credit > 0:
                self.todo.pop(0)
                self.waiting = self.txn.send(link, Message(body=body))
            return
        action = self.steps[self.step][1]
        if action is None:
            return  # left open
        txn, self.txn = self.txn, None
        txn.commit() if action == "commit" else txn.abort()

    def _next(self, result):
        self.results.append(result)
        self.step += 1
        if self.step < len(self.steps):
            self.container.declare_transaction(self.conn, handler=self)

    def on_transaction_committed(self, event):
        self._next("committed")

    def on_transaction_aborted(self, event):
        self._next("aborted")

    def on_transaction_commit_failed(self, event):
        cond = event.delivery.remote.condition
        self._next("commit failed: %s: %s" % (cond.name, cond.description) if cond else "commit failed")

    def done(self):
        return self.step == len(self.steps)

    def status(self):
        return "Steps: step %d of %d, results %r, outcomes %r" % (
            self.step, len(self.steps), self.results, self.outcomes)


@pytest.fixture
def two_brokers(start_router, start_broker, tmpdir_path, config_file):
    """A router with brokers b1 and b2 behind it:
    (router url, ("on-b1", b1), ("on-b2", b2))."""
    cfg = config_file(PINNED)
    r = start_router("--config", cfg)
    brokers = [start_broker(os.path.join(tmpdir_path, name), "--config", cfg, "--router", r.url,
                            "--container-id", name) for name in ("b1", "b2")]
    r.wait_for_log(BROKER_UP, count=2)
    return r.url, ("on-b1", brokers[0]), ("on-b2", brokers[1])


def test_each_transaction_goes_to_the_broker_of_its_first_address(two_brokers):
    """On one connection and one coordinator link, through a router: a
    transaction on a queue of b1, then one on a queue of b2, then one on
    b1 rolled back. Each commits (or rolls back) at its own broker."""
    url, (qa, _), (qb, _) = two_brokers
    steps = Steps(url, [
        ([(qa, ["a1", "a2", "a3"])], "commit"),
        ([(qb, ["b1", "b2"])], "commit"),
        ([(qa, ["gone"])], "abort"),
        ([], "commit"),  # nothing under it: answered by the router
    ])
    play(steps)
    assert steps.results == ["committed", "committed", "aborted", "committed"], steps.status()
    assert before_marker(url, queue=qa) == ["a1", "a2", "a3"]
    assert before_marker(url, queue=qb) == ["b1", "b2"]


def test_a_transaction_across_two_brokers_is_refused_and_rolls_back(two_brokers):
    """A transaction that touched b1's queue cannot take a message for
    b2's: that transfer is refused, saying why, and the commit rolls back
    what the transaction held on b1."""
    url, (qa, _), (qb, _) = two_brokers
    steps = Steps(url, [([(qa, ["on b1"]), (qb, ["on b2"])], "commit"), ([(qb, ["alone"])], "commit")])
    play(steps)
    (_, _, c1, _), (_, state, cond, why) = steps.outcomes[:2]
    assert c1 is None, steps.status()
    assert (state, cond) == (Delivery.REJECTED, "amqp:not-implemented"), steps.status()
    assert "spans the queues of one broker" in why, why
    assert steps.results[0].startswith("commit failed: amqp:transaction:rollback"), steps.status()
    assert steps.results[1] == "committed", steps.status()
    assert before_marker(url, queue=qa) == [], "a rolled back transaction's message was stored"
    assert before_marker(url, queue=qb) == ["alone"]


def test_a_client_gone_mid_transaction_gives_back_what_it_took(two_brokers):
    """Through a router, a client that took messages under a transaction
    and left without discharging it: its broker rolls the transaction back
    and the messages come again, in order. And a client with many open
    transactions through the router leaves none of them behind: others
    can still declare."""
    url, (qa, b1), _ = two_brokers
    publish(url, qa, ["m1", "m2"])

    class Leaver(TxTaker):
        def on_message(self, event):
            self.got.append(event.message.body)
            self.txn.accept(event.delivery)
            if len(self.got) == self.n:
                self.outcome = "left"

    for _ in range(3):
        play(Leaver(url, qa, 2))
        assert before_marker(url, queue=qa, marker="m-mark") == ["m1", "m2"]
        publish(url, qa, ["m1", "m2"])
    assert before_marker(url, queue=qa, marker="m-mark") == ["m1", "m2"]

    class Dropper(Steps):
        """Sends one message under a transaction and leaves it open."""

        def done(self):
            return bool(self.outcomes)

    # More clients than a broker allows one client open transactions,
    # each leaving one behind at b1 through the same router connection.
    droppers = [Dropper(url, [([(qa, ["dropped"])], None)]) for _ in range(70)]
    play(*droppers)
    assert all(d.outcomes[0][2] is None for d in droppers), [d.outcomes for d in droppers if d.outcomes[0][2]]
    after = Steps(url, [([(qa, ["kept"])], "commit")])
    play(after)
    assert after.results == ["committed"], after.status()
    assert before_marker(url, queue=qa) == ["kept"], "a transaction of a client that left was committed"
    wait_until("b1 to hold nothing for the clients that left",
               lambda: b1.queues()[qa]["unsettled"] == 0, timeout=TIMEOUT)


def test_transactions_through_an_edge_router(start_router, start_broker, tmpdir_path, config_file):
    """A client of an edge router (which places no addresses: its uplink
    does, and says which broker it picked): a transaction commits at the
    broker and one rolled back leaves nothing."""
    cfg = config_file(CONFIG)
    interior = start_router("--config", cfg, "--inter-router", "127.0.0.1:0", "--router-id", "interior")
    start_broker(os.path.join(tmpdir_path, "data"), "--config", cfg, "--router", interior.url)
    interior.wait_for_log(BROKER_UP)
    edge = start_router("--config", cfg, "--mode", "edge", "--router-id", "edge",
                        "--peer", "127.0.0.1:%d" % interior.ports["inter-router"])
    interior.wait_for_log(r"router=edge two_way=true edge=true")
    steps = Steps(edge.url, [([(QUEUE, ["e1", "e2"])], "commit"), ([(QUEUE, ["gone"])], "abort")])
    play(steps)
    assert steps.results == ["committed", "aborted"], steps.status()
    assert before_marker(edge.url) == ["e1", "e2"]
