#!/usr/bin/env python3
"""What transactions cost the broker's journal (issue 14): at a fixed rate,
a python-qpid-proton producer sends durable 1 KiB messages to a queue,
either one by one (each waits for its own acceptance) or in transactions
of BATCH messages (declare, send, commit). No consumer: its
acknowledgements are journal records too, the same with or without
transactions. The broker's own count of journal syncs (its $stat
`journal.syncs`) before and after gives syncs per message and per batch.

    bench/broker-tx.py [SECONDS] [RATE] [BATCH]     (default 10 s, 1000/s, 10)

Starts its own `flotilla broker` (FLOTILLA_BIN, default
target/release/flotilla) on a fresh data dir; prints a markdown table.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time

from proton import Message
from proton.handlers import MessagingHandler, TransactionHandler
from proton.reactor import Container

SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 10
RATE = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
BATCH = int(sys.argv[3]) if len(sys.argv) > 3 else 10
BIN = os.environ.get("FLOTILLA_BIN", "target/release/flotilla")
BODY = "x" * 1024


def journal(url):
    out = subprocess.run([BIN, "stat", "--url", url, "--json"], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["journal"]


class Load(MessagingHandler, TransactionHandler):
    """Sends at RATE for SECONDS, in transactions of `batch` (0: none)."""

    def __init__(self, url, address, batch):
        super().__init__(prefetch=200)
        self.url, self.address, self.batch = url, address, batch
        self.sent = self.accepted = self.committed = 0
        self.txn = None
        self.busy = False

    def on_start(self, event):
        self.container = event.container
        self.conn = event.container.connect(self.url)
        self.sender = event.container.create_sender(self.conn, self.address)
        self.start = time.monotonic()
        self.deadline = self.start + SECONDS
        event.container.schedule(0.001, self)

    def due(self):
        return int((time.monotonic() - self.start) * RATE) - self.sent

    def on_timer_task(self, event):
        if time.monotonic() >= self.deadline:
            self.conn.close()
            return
        if self.batch == 0:
            for _ in range(max(0, self.due())):
                if self.sender.credit == 0:
                    break
                self.sender.send(Message(body=BODY, durable=True))
                self.sent += 1
        elif not self.busy and self.due() >= self.batch:
            self.busy = True
            self.container.declare_transaction(self.conn, handler=self)
        self.container.schedule(0.001, self)

    def on_transaction_declared(self, event):
        for _ in range(self.batch):
            event.transaction.send(self.sender, Message(body=BODY, durable=True))
            self.sent += 1
        event.transaction.commit()

    def on_transaction_committed(self, event):
        self.committed += 1
        self.busy = False

    def on_accepted(self, event):
        self.accepted += 1


def run(url, address, batch):
    before = journal(url)
    h = Load(url, address, batch)
    Container(h).run()
    after = journal(url)
    syncs = after["syncs"] - before["syncs"]
    return h, syncs


def main():
    data = tempfile.mkdtemp(prefix="flotilla-tx-bench-")
    proc = subprocess.Popen([BIN, "broker", "--amqp", "127.0.0.1:0", "--data-dir", data],
                            stderr=subprocess.PIPE, text=True)
    try:
        port = None
        while port is None:
            line = proc.stderr.readline()
            if not line:
                raise SystemExit("the broker exited")
            m = re.search(r"listening.*addr=127\.0\.0\.1:(\d+)", line)
            if m:
                port = m.group(1)
        url = "amqp://127.0.0.1:%s" % port
        rows = []
        for name, batch in (("one by one", 0), ("transactions of %d" % BATCH, BATCH)):
            h, syncs = run(url, "tx-bench-%d" % batch, batch)
            per_msg = syncs / h.sent if h.sent else 0
            per_batch = syncs / h.committed if h.committed else None
            accepted = h.accepted if batch == 0 else h.committed * batch
            rows.append((name, h.sent, accepted, h.committed, syncs, per_msg, per_batch))
            print("broker-tx.py: %s: sent %d, accepted %d, committed %d, journal syncs %d"
                  % (name, h.sent, accepted, h.committed, syncs), file=sys.stderr)
        print("| %.0f s at %d msg/s, 1 KiB durable | sent | accepted | commits | journal syncs | syncs/message | syncs/batch |" % (SECONDS, RATE))
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, sent, accepted, committed, syncs, per_msg, per_batch in rows:
            print("| %s | %d | %d | %s | %d | %.2f | %s |" % (
                name, sent, accepted, committed or "-", syncs, per_msg,
                "%.2f" % per_batch if per_batch is not None else "-"))
    finally:
        proc.kill()
        proc.wait()
        subprocess.run(["rm", "-rf", data])


if __name__ == "__main__":
    main()
