"""Looking after a dead-letter queue through the console's REST API: browse
its first messages, delete one, move the rest back to where they came
from (retry), with a router and a broker following the console and
python-qpid-proton clients."""

import os
import urllib.parse

import pytest
from proton import Message
from proton.utils import LinkDetached

from conftest import connect
from test_broker import BROKER_UP, bodies, modified_failed, take
from test_console import until


@pytest.fixture
def ops(console, start_router, start_broker, tmpdir_path):
    """A space `ops` (anonymous clients) with queue `work`, whose failures
    go to `work-dlq` after one delivery; a router and a broker following
    the console. Returns the router."""
    console.expect("POST", "/api/v1/addressspaces",
                   {"metadata": {"name": "ops"}, "spec": {"authentication": {"anonymous": True}}}, 201)
    for name, policy in (("work", {"deadLetterAddress": "work-dlq", "maxDeliveries": 1}), ("work-dlq", None)):
        spec = {"address": name, "type": "queue"}
        if policy:
            spec["policy"] = policy
        console.expect("POST", "/api/v1/addressspaces/ops/addresses", {"metadata": {"name": name}, "spec": spec}, 201)
    follow = console.follow_args()
    r = start_router(*follow)
    start_broker(os.path.join(tmpdir_path, "broker"), *follow, "--router", r.url)
    r.wait_for_log(BROKER_UP)
    return r


def attach_when_known(conn, address, **kw):
    def attempt():
        try:
            return conn.create_receiver(address, **kw)
        except LinkDetached:
            return None
    return until("the address %r" % address, attempt)


def messages(console, address, limit=None):
    path = "/api/v1/addressspaces/ops/queues/%s/messages" % urllib.parse.quote(address, safe="")
    if limit:
        path += "?limit=%d" % limit
    return console.expect("GET", path)


def test_dead_letters_are_browsed_deleted_and_retried(console, ops):
    c = connect(ops.url, virtual_host="ops")
    rcv = attach_when_known(c, "work", credit=0)
    s = c.create_sender("work")
    for i in range(3):
        s.send(Message(body="job %d" % i, properties={"n": i}))
    for _ in range(3):
        take(rcv, 1, settle=None)
        modified_failed(rcv)
    c.close()

    # All three are in the dead-letter queue, saying where they came from.
    dlq = until("three dead letters", lambda: (lambda v: v if len(v["items"]) == 3 else None)(messages(console, "work-dlq")))
    assert [m["body"]["text"] for m in dlq["items"]] == ["job 0", "job 1", "job 2"]
    first = dlq["items"][0]
    assert first["applicationProperties"] == {"n": 0}
    assert first["annotations"]["x-opt-flotilla-original-address"] == "work"
    assert dlq["depth"] == 3
    assert [m["body"]["text"] for m in messages(console, "work-dlq", limit=1)["items"]] == ["job 0"]

    # Delete one; it is gone, and deleting it again is a 404.
    path = "/api/v1/addressspaces/ops/queues/work-dlq/messages/%d" % first["id"]
    console.expect("DELETE", path)
    console.expect("DELETE", path, status=404)
    assert [m["body"]["text"] for m in messages(console, "work-dlq")["items"]] == ["job 1", "job 2"]

    # Retry one by id, then the rest: back to `work`, in order.
    second = messages(console, "work-dlq")["items"][0]["id"]
    assert console.expect("POST", "/api/v1/addressspaces/ops/queues/work-dlq/retry", {"ids": [second]}) == {"moved": 1, "skipped": 0}
    assert console.expect("POST", "/api/v1/addressspaces/ops/queues/work-dlq/retry") == {"moved": 1, "skipped": 0}
    assert messages(console, "work-dlq")["items"] == []
    c = connect(ops.url, virtual_host="ops")
    rcv = c.create_receiver("work", credit=10)
    assert bodies(take(rcv, 2)) == ["job 1", "job 2"]
    c.close()


def test_a_queue_is_purged_by_its_address(console, ops):
    c = connect(ops.url, virtual_host="ops")
    rcv = attach_when_known(c, "work", credit=0)
    s = c.create_sender("work")
    s.send(Message(body="poison"))
    take(rcv, 1, settle=None)
    modified_failed(rcv)
    c.close()
    until("a dead letter", lambda: messages(console, "work-dlq")["items"] or None)
    assert console.expect("POST", "/api/v1/addressspaces/ops/queues/work-dlq/purge") == {"purged": 1}
    assert messages(console, "work-dlq")["items"] == []


def test_bad_requests_are_refused_with_a_reason(console, ops):
    console.expect("GET", "/api/v1/addressspaces/ops/queues/nothing-here/messages", status=404)
    console.expect("GET", "/api/v1/addressspaces/ops/queues/work/messages?limit=0", status=400)
    console.expect("DELETE", "/api/v1/addressspaces/ops/queues/work/messages/not-a-number", status=400)
    console.expect("POST", "/api/v1/addressspaces/ops/queues/work/retry", {"ids": ["x"]}, status=400)
    console.expect("GET", "/api/v1/addressspaces/nope/queues/work/messages", status=404)


def test_a_stranger_reaches_neither_messages_nor_answers(console, ops):
    """Without the admin token: 401, for browsing and for posting a
    broker's answer."""
    import urllib.error
    import urllib.request

    for method, path, body in (
        ("GET", "/api/v1/addressspaces/ops/queues/work/messages", None),
        ("POST", "/api/v1/addressspaces/ops/queues/work/retry", b"{}"),
        ("POST", "/api/v1/answers", b'{"id": 1, "from": "x", "result": {"found": true}}'),
    ):
        req = urllib.request.Request(console.url + path, data=body, method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 401, (method, path)
