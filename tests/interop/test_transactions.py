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
from proton import Endpoint, Message, Timeout
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


def before_marker(url, marker="marker", limit=1000):
    """Publishes `marker` to the queue, then takes (accepting) from a new
    receiver until it comes: what the queue held before it, in order."""
    publish(url, QUEUE, [marker])
    c = connect(url)
    got = []
    try:
        rcv = c.create_receiver(QUEUE, credit=100)
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
