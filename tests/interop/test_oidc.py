"""Tokens from an OIDC provider (issue 16) with clients no one here wrote:
python-qpid-proton (PLAIN with the token as the password), rhea (SASL
OAUTHBEARER through its `sasl_mechanisms` option, and its own XOAUTH2),
paho-mqtt 3.1.1 and 5.0 (the token as the password, and MQTT 5 enhanced
authentication), a raw AMQP SASL exchange where the bytes matter, and
urllib on the console's API.

The issuer is real (oidc_issuer.py): keys made by the test, a discovery
document and a JWKS over HTTP, tokens signed by hand. One console with a
router, a broker and an MQTT gateway following it serves the module;
tenant-a trusts the issuer through `jwksUri`, tenant-b a second issuer
through its discovery document. Waiting for a token to expire is a real
wait: those tokens live 3 s, with a clock skew of 1 s."""

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from proton import ConnectionException, Data, Delivery, Described, Endpoint, Message, symbol, uint, ulong
from proton.reactor import AtMostOnce
from proton.utils import ConnectionClosed, LinkDetached

from conftest import ROOT, TIMEOUT, Broker, Console, Gateway, Lwt, Router, Scenario, connect
from mqtt_client import Client, Refused
from oidc_issuer import AUDIENCE, Issuer, decode_part
from test_console import until
from test_mqtt import clients  # noqa: F401 (fixture)
from test_proton import Recv, Send

BROKER_UP = r"broker connected \(route container\)"
GATEWAY_UP = r"component connected .*gateway=true"
# tenant-a's clock skew: a token is refused, and its connection closed, 1 s
# after its `exp`.
SKEW = 1
# A short-lived token's lifetime.
SHORT = 3
# An issuer's keys are fetched again for an unknown kid at most every 10 s
# (core/src/oidc.rs REFETCH_AT_MOST); this is that and a margin.
REFETCH_WINDOW = 10.5
RHEA_DIR = os.path.join(ROOT, "tests", "interop", "rhea")

RULES = [
    {"claim": "roles", "value": "app", "addresses": ["#"], "operations": ["send", "recv"]},
    {"claim": "roles", "value": "writer", "addresses": ["orders/#"], "operations": ["send"]},
    {"claim": "roles", "value": "reader", "addresses": ["#"], "operations": ["recv"]},
]


def space(name, oidc):
    return {"metadata": {"name": name}, "spec": {"authentication": {"anonymous": False, "oidc": oidc}}}


def address(console, space_name, name, addr, kind="anycast"):
    console.expect("POST", "/api/v1/addressspaces/%s/addresses" % space_name,
                   {"metadata": {"name": name}, "spec": {"address": addr, "type": kind}}, 201)


class Env:
    """The module's processes and issuers."""

    def __init__(self, d):
        self.procs = []
        self.issuer = Issuer()
        self.second = Issuer(realm="/realms/second")
        try:
            self._start(d)
        except BaseException:
            self.stop()
            raise

    def _start(self, d):
        self.console = self._keep(Console(os.path.join(d, "console")))
        follow = self.console.follow_args()
        self.router = self._keep(Router(*follow, "--http", "127.0.0.1:0"))
        self._keep(Broker(os.path.join(d, "broker"), *follow, "--router", self.router.url))
        self.router.wait_for_log(BROKER_UP)
        # The last-will service keeps the gateway's clients' wills.
        self._keep(Lwt(os.path.join(d, "lwt"), self.router, *follow))
        self.gateway = self._keep(Gateway(*follow, "--router", self.router.url, "--http", "127.0.0.1:0"))
        self.router.wait_for_log(GATEWAY_UP, count=2)

        self.console.expect("POST", "/api/v1/addressspaces", space("tenant-a", {
            "issuer": self.issuer.issuer, "audience": AUDIENCE, "jwksUri": self.issuer.jwks_uri,
            "clockSkewSeconds": SKEW, "authorization": RULES}), 201)
        address(self.console, "tenant-a", "inbox", "inbox")
        address(self.console, "tenant-a", "orders-eu", "orders/eu")
        address(self.console, "tenant-a", "audit", "audit")
        address(self.console, "tenant-a", "sensors", "sensors/#", "topic")
        # Through discovery (no jwksUri), and MQTT/PLAIN usernames checked
        # against a claim.
        self.console.expect("POST", "/api/v1/addressspaces", space("tenant-b", {
            "issuer": self.second.issuer + "/", "audience": AUDIENCE, "clockSkewSeconds": SKEW,
            "usernameClaim": "preferred_username", "authorization": RULES[:1]}), 201)
        address(self.console, "tenant-b", "inbox", "inbox")

        for addr in ("inbox", "orders/eu", "audit"):
            until("the router to take tenant-a's tokens for %r" % addr,
                  lambda: attach_ok(self.router.url, self.token(), addr))
        until("the gateway to take tenant-a's tokens",
              lambda: mqtt_ok(self.gateway.port, self.token(), "meter@tenant-a"))

    def _keep(self, p):
        self.procs.append(p)
        return p

    def token(self, **kw):
        """A token of the main issuer for tenant-a, role app (unless said)."""
        kw.setdefault("roles", ["app"])
        return self.issuer.token(**kw)

    def ready_b(self):
        """Waits until the router takes tenant-b's tokens (its keys come
        through the second issuer's discovery document)."""
        until("the router to take tenant-b's tokens",
              lambda: attach_ok(self.router.url, self.token_b(), "inbox", user="meter-7@tenant-b"))

    def token_b(self, **kw):
        """A token of the second issuer for tenant-b (user meter-7)."""
        kw.setdefault("roles", ["app"])
        kw.setdefault("tenant", "tenant-b")
        kw.setdefault("preferred_username", "meter-7")
        return self.second.token(**kw)

    def stop(self):
        for p in reversed(self.procs):
            p.stop()
        self.issuer.stop()
        self.second.stop()


@pytest.fixture(scope="module")
def env():
    d = tempfile.mkdtemp(prefix="flotilla-oidc-")
    try:
        e = Env(d)
        try:
            yield e
        finally:
            e.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- helpers ----

def plain(url, token, user="device-1@tenant-a", **kw):
    """A blocking proton connection with SASL PLAIN, the token as password."""
    return connect(url, user=user, password=token, allowed_mechs="PLAIN", **kw)


@pytest.fixture
def amqp(env):
    """`amqp(token, user=..., **kw)`: a PLAIN connection to the router;
    every one still open is closed after the test (a connection left with
    a receiver would take the next test's messages)."""
    made = []

    def open_(token, user="device-1@tenant-a", **kw):
        c = plain(env.router.url, token, user, **kw)
        made.append(c)
        return c

    yield open_
    for c in made:
        try:
            c.close()
        except Exception:
            pass


def attach_ok(url, token, addr, user="device-1@tenant-a"):
    c = None
    try:
        c = plain(url, token, user)
        c.create_receiver(addr, credit=1)
        return True
    except (ConnectionException, LinkDetached):
        return None
    finally:
        closed(c)


def mqtt_ok(port, token, user):
    try:
        Client(port, user=user, password=token).close()
        return True
    except Refused:
        return None


def refusal(url, token, user="device-1@tenant-a", **kw):
    """Why a PLAIN login with `token` failed (the text of the error), or
    None when a receiver could attach. (When the Open names the space, the
    refusal comes as a Close after our Open.)"""
    c = None
    try:
        c = plain(url, token, user, **kw)
        c.create_receiver("inbox", credit=1)
    except (ConnectionException, LinkDetached) as e:
        return str(e)
    finally:
        closed(c)
    return None


def closed(c):
    """Closes `c` (if any) whatever state the peer left it in."""
    if c is not None:
        try:
            c.close()
        except Exception:
            pass


def round_trip(conn, addr, n):
    """Sends `n` messages and a marker to `addr` and receives until the
    marker on one connection: exactly the `n` come first."""
    rcv = conn.create_receiver(addr, credit=n + 1)
    snd = conn.create_sender(addr, options=AtMostOnce())
    bodies = ["%s %d" % (addr, i) for i in range(n)] + ["marker"]
    for b in bodies:
        snd.send(Message(body=b))
    got = []
    while not got or got[-1] != "marker":
        got.append(rcv.receive(timeout=TIMEOUT).body)
    snd.close()
    rcv.close()
    return got, bodies


def wait_closed(c, timeout):
    """Waits for the peer to close connection `c`; returns proton's
    ConnectionClosed (links detached on the way are passed over)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            c.wait(lambda: c.conn.state & Endpoint.REMOTE_CLOSED, timeout=max(0.1, deadline - time.monotonic()))
        except ConnectionClosed as e:
            return e
        except LinkDetached:
            continue
        raise AssertionError("closed without an error condition")


def refused_attach(create, addr):
    with pytest.raises(LinkDetached) as e:
        create(addr)
    return e.value.condition


def logged_in(part, **login):
    """`part` (a test_proton Recv or Send) connecting with `login`."""
    def start(container):
        part.conn = container.connect(part.url, handler=part, reconnect=False, **login)
        part.attach(container)
    part.start = start
    return part


def run(*parts):
    """Runs `parts` until all are done, then closes their connections (a
    receiver left with credit would take a later test's messages)."""
    s = Scenario(parts, lambda: all(p.done() for p in parts), close=True).run()
    assert not s.timed_out, "scenario timed out: %r" % [(type(p).__name__, p.done()) for p in parts]


def log_lines(proc, pattern):
    rx = re.compile(pattern)
    return sum(1 for l in list(proc.log) if rx.search(l))


AUDIT_REFUSED = r"flotilla::auth.*refused"


def http_get(port, path, token):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path),
                                 headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        return r.read().decode()


def token_auth_counts(port, token):
    """{outcome: total} of flotilla_token_auth_total on a /metrics."""
    out = {}
    for line in http_get(port, "/metrics", token).splitlines():
        m = re.match(r"flotilla_token_auth_total\{([^}]*)\} (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[labels.get("outcome")] = out.get(labels.get("outcome"), 0) + float(m.group(2))
    return out


def wait_refetch_window(issuer):
    """Waits (a real wait, bounded by REFETCH_WINDOW) until an unknown kid
    may make the issuer's keys be fetched again."""
    last = issuer.last_fetch()
    if last is not None:
        time.sleep(max(0.0, last + REFETCH_WINDOW - time.monotonic()))


# ---- AMQP: PLAIN with the token as the password ----

@pytest.mark.parametrize("naming", ["virtual_host", "user@space", "tenant claim"])
def test_a_valid_token_sends_and_receives_whichever_way_the_space_is_named(env, amqp, naming):
    # Each key the issuer publishes (RS256, ES256, EdDSA) signs one login.
    for kid in list(env.issuer.keys)[:3]:
        tok = env.token(kid=kid)
        if naming == "virtual_host":
            c = amqp(tok, user="device-1", virtual_host="tenant-a")
        elif naming == "user@space":
            c = amqp(tok, user="device-1@tenant-a")
        else:
            c = amqp(tok, user="device-1")
        got, sent = round_trip(c, "inbox", 3)
        assert got == sent, (env.issuer.keys[kid].alg, got)
        c.close()


def test_an_audience_array_naming_us_is_accepted(env, amqp):
    c = amqp(env.token(aud=["account", AUDIENCE]))
    assert round_trip(c, "inbox", 1)[0] == ["inbox 0", "marker"]
    c.close()


def test_keys_through_discovery_and_a_trailing_slash_on_the_issuer(env, amqp):
    # tenant-b's issuer is configured with a trailing `/`; its tokens' iss
    # has none. It has no jwksUri: the discovery document says where.
    env.ready_b()
    assert env.second.fetches(env.second.discovery_path) >= 1
    assert env.second.fetches() >= 1
    c = amqp(env.token_b(), user="meter-7@tenant-b")
    assert round_trip(c, "inbox", 2)[0] == ["inbox 0", "inbox 1", "marker"]
    c.close()


# ---- AMQP: OAUTHBEARER and XOAUTH2 (rhea) ----

def rhea(port, mechanism, token, address="inbox", count=5, user=None, sasl_hostname=None, hostname=None):
    """Runs the rhea token client (rhea/sasl_token_client.mjs); its result."""
    if shutil.which("node") is None or not os.path.isdir(os.path.join(RHEA_DIR, "node_modules", "rhea")):
        pytest.skip("node and tests/interop/rhea/node_modules are needed (npm ci there)")
    args = {"port": port, "mechanism": mechanism, "token": token, "address": address, "count": count,
            "user": user, "saslHostname": sasl_hostname, "hostname": hostname}
    p = subprocess.run(["node", os.path.join(RHEA_DIR, "sasl_token_client.mjs"), json.dumps(args)],
                       capture_output=True, text=True, timeout=TIMEOUT + 10, cwd=RHEA_DIR)
    assert p.returncode == 0 and p.stdout.strip(), (p.returncode, p.stdout, p.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mechanism,user,sasl_hostname", [
    ("OAUTHBEARER", None, None),               # the tenant claim names the space
    ("OAUTHBEARER", None, "tenant-a"),         # SASL hostname
    ("OAUTHBEARER", "device-1@tenant-a", None),  # authzid
    ("XOAUTH2", "device-1", None),
    ("XOAUTH2", "device-1", "tenant-a"),
])
def test_rhea_logs_in_with_a_bearer_token_and_sends_and_receives(env, mechanism, user, sasl_hostname):
    got = rhea(env.router.ports["amqp"], mechanism, env.token(), count=5, user=user, sasl_hostname=sasl_hostname)
    assert "error" not in got, got
    assert got["received"] == ["token msg %d" % i for i in range(5)], got
    assert got["accepted"] == 5, got


@pytest.mark.parametrize("sasl_hostname", ["tenant-a", None], ids=["SASL hostname", "space known at Open"])
@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
def test_rhea_with_an_expired_or_forged_bearer_token_is_refused(env, mechanism, sasl_hostname):
    # With a SASL hostname the SASL outcome refuses; without one the space
    # is known only at Open (an Open hostname would name it, else the
    # tenant claim): Open, then Close amqp:unauthorized-access. rhea sends
    # Begin and Attach right after its Open, before the server's arrives:
    # the server has to go on reading until the client's Close (AMQP 1.0
    # §2.4.3) for the Close to reach the client.
    for tok in (env.token(lifetime=-120), Issuer.tampered(env.token(), sub="someone-else"), env.issuer.unsigned()):
        got = rhea(env.router.ports["amqp"], mechanism, tok, count=1, user="device-1", sasl_hostname=sasl_hostname)
        assert got.get("error", {}).get("condition") == "amqp:unauthorized-access", got
        assert "received" not in got, got


AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
SASL_HEADER = b"AMQP\x03\x01\x00\x00"


def _copied(v):
    if isinstance(v, memoryview):
        return bytes(v)
    if isinstance(v, Described):
        return Described(v.descriptor, _copied(v.value))
    if isinstance(v, list):
        return [_copied(x) for x in v]
    return v


class RawAmqp:
    """An AMQP connection byte by byte: the SASL layer's frames as the
    spec has them (AMQP 1.0 §5.3), encoded and decoded with proton's Data."""

    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)

    def exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise EOFError("closed after %r" % buf)
            buf += chunk
        return buf

    def send_frame(self, kind, descriptor, fields):
        d = Data()
        d.put_object(Described(ulong(descriptor), fields))
        body = bytes(d.encode())
        self.s.sendall(struct.pack(">IBBH", 8 + len(body), 2, kind, 0) + body)

    def read_frame(self):
        """(descriptor, fields) of the next frame (empty frames skipped)."""
        while True:
            size, doff, _, _ = struct.unpack(">IBBH", self.exact(8))
            rest = self.exact(size - 8)[doff * 4 - 8:]
            if rest:
                d = Data()
                d.decode(rest)
                d.rewind()
                d.next()
                o = d.get_object()
                # Binary values are views into `d`: copied while it lives.
                return int(o.descriptor), [_copied(v) for v in o.value]

    def sasl(self, mechanism, initial_response, hostname=None):
        """The SASL exchange: returns (offered mechanisms, outcome code,
        additional data, challenges)."""
        self.s.sendall(SASL_HEADER)
        assert self.exact(8) == SASL_HEADER
        desc, fields = self.read_frame()
        assert desc == 0x40, desc  # sasl-mechanisms
        mechs = fields[0]
        mechs = [str(m) for m in (mechs.elements if hasattr(mechs, "elements") else [mechs])]
        self.send_frame(1, 0x41, [symbol(mechanism), initial_response, hostname])
        challenges = []
        while True:
            desc, fields = self.read_frame()
            if desc == 0x42:  # sasl-challenge: RFC 7628 §3.2.3 answers with ^A
                challenges.append(bytes(fields[0]))
                self.send_frame(1, 0x43, [b"\x01"])
            else:
                assert desc == 0x44, desc  # sasl-outcome
                extra = fields[1] if len(fields) > 1 else None
                return mechs, int(fields[0]), (bytes(extra) if extra is not None else None), challenges

    def open(self, hostname=None):
        """Sends the AMQP header and an Open; the first performative back."""
        self.s.sendall(AMQP_HEADER)
        assert self.exact(8) == AMQP_HEADER
        self.send_frame(0, 0x10, ["raw-oidc-client", hostname])
        return self.read_frame()

    def begin(self):
        """Sends a Begin; the first performative back."""
        self.send_frame(0, 0x11, [None, uint(0), uint(100), uint(100)])
        return self.read_frame()

    def close(self):
        self.s.close()


def test_raw_sasl_offers_token_mechanisms_and_answers_with_the_right_outcome(env):
    port = env.router.ports["amqp"]
    good = env.token()
    # OAUTHBEARER with host and port pairs (RFC 7628 §3.1), then an Open back.
    raw = RawAmqp(port)
    mechs, code, _, _ = raw.sasl("OAUTHBEARER", ("n,,\x01host=127.0.0.1\x01port=%d\x01auth=Bearer %s\x01\x01"
                                                 % (port, good)).encode())
    assert {"OAUTHBEARER", "XOAUTH2", "PLAIN", "SCRAM-SHA-256"} <= set(mechs), mechs
    assert code == 0
    desc, fields = raw.open()
    assert desc == 0x10, (desc, fields)  # Open
    desc, fields = raw.begin()
    assert desc == 0x11, (desc, fields)  # Begin, not Close
    raw.close()
    # A forged token for the space the SASL hostname names: outcome auth,
    # and OAUTHBEARER says why as JSON.
    raw = RawAmqp(port)
    _, code, extra, challenges = raw.sasl("OAUTHBEARER", ("n,a=device-1,\x01auth=Bearer %s\x01\x01"
                                                          % env.issuer.unsigned()).encode(), "tenant-a")
    raw.close()
    assert code == 1
    said = extra if extra is not None else (challenges[0] if challenges else b"")
    assert json.loads(said)["status"] == "invalid_token", (extra, challenges)
    # XOAUTH2 with an expired token: outcome auth.
    raw = RawAmqp(port)
    _, code, _, _ = raw.sasl("XOAUTH2", ("user=device-1@tenant-a\x01auth=Bearer %s\x01\x01"
                                         % env.token(lifetime=-60)).encode())
    raw.close()
    assert code == 1
    # No space named at SASL: the outcome is ok, and the Open decides:
    # the server's Open, then Close amqp:unauthorized-access.
    raw = RawAmqp(port)
    _, code, _, _ = raw.sasl("OAUTHBEARER", ("n,,\x01auth=Bearer %s\x01\x01" % env.token(lifetime=-60)).encode())
    assert code == 0
    assert raw.open()[0] == 0x10
    desc, fields = raw.read_frame()
    raw.close()
    assert desc == 0x18, (desc, fields)  # Close
    assert str(fields[0].value[0]) == "amqp:unauthorized-access", fields
    # XOAUTH2 that works.
    raw = RawAmqp(port)
    _, code, _, _ = raw.sasl("XOAUTH2", ("user=device-1\x01auth=Bearer %s\x01\x01" % good).encode(), "tenant-a")
    assert code == 0
    assert raw.open("tenant-a")[0] == 0x10
    assert raw.begin()[0] == 0x11
    raw.close()


# ---- AMQP: refusals ----

def forged(env, case):
    i, now = env.issuer, int(time.time())
    return {
        "expired": lambda: env.token(lifetime=-120),
        "not yet valid": lambda: env.token(nbf=now + 120),
        "wrong audience": lambda: env.token(aud="someone-else"),
        "wrong audience array": lambda: env.token(aud=["account", "someone-else"]),
        "wrong issuer": lambda: env.token(iss="http://127.0.0.1:1/realms/evil"),
        "another issuer's token": lambda: env.token_b(tenant="tenant-a"),
        "wrong tenant": lambda: env.token(tenant="tenant-b"),
        "tampered": lambda: Issuer.tampered(env.token(), sub="admin"),
        "tampered roles": lambda: Issuer.tampered(env.token(roles=["reader"]), roles=["app"]),
        "alg none": lambda: i.unsigned(roles=["app"]),
        "alg none, signature kept": lambda: i.unsigned(roles=["app"]) + env.token().split(".")[2],
        "HS256 with the public key": lambda: i.hs256_with_public_key(roles=["app"]),
        "no kid": lambda: env.token(header={"kid": None}),
        "no exp": lambda: env.token(exp=None),
        "no sub": lambda: env.token(sub=None),
        "no tenant claim": lambda: env.token(tenant=None),
        "ES256 key, RS256 header": lambda: _wrong_alg(env),
        "not a JWT": lambda: "not.a-jwt",
    }[case]()


def _wrong_alg(env):
    """Signed by the RSA key but naming the EC key's kid (RS256 header):
    the key's algorithm rules, not the header's."""
    es = next(k for k in env.issuer.keys.values() if k.alg == "ES256")
    return env.token(header={"kid": es.kid})


REFUSALS = ["expired", "not yet valid", "wrong audience", "wrong audience array", "wrong issuer",
            "another issuer's token", "wrong tenant", "tampered", "tampered roles", "alg none",
            "alg none, signature kept", "HS256 with the public key", "no kid", "no exp", "no sub",
            "no tenant claim", "ES256 key, RS256 header", "not a JWT"]


@pytest.mark.parametrize("case", REFUSALS)
def test_a_bad_token_is_refused_with_unauthorized_access_and_audited(env, case):
    tok = forged(env, case)
    before = log_lines(env.router, AUDIT_REFUSED)
    why = refusal(env.router.url, tok, user="device-1@tenant-a")
    assert why is not None and "amqp:unauthorized-access" in why, why
    if case != "not a JWT":  # (not a token: a wrong password)
        env.router.wait_for_log(AUDIT_REFUSED, count=before + 1)
    # The space named only at Open: refused all the same.
    why = refusal(env.router.url, tok, user="device-1", virtual_host="tenant-a")
    assert why is not None and "amqp:unauthorized-access" in why, why
    # Never the token in the log.
    signature = tok.split(".")[-1]
    assert not signature or not any(signature in l for l in list(env.router.log)), case


def test_a_token_naming_a_space_that_does_not_exist_opens_nothing(env):
    for tok, kw in [(env.token(tenant="nowhere"), {"user": "device-1"}),
                    (env.token(tenant="default"), {"user": "device-1"}),
                    (env.token(), {"user": "device-1@tenant-b"}),
                    (env.token(), {"user": "device-1", "virtual_host": "tenant-b"})]:
        why = refusal(env.router.url, tok, **kw)
        assert why is not None and "amqp:unauthorized-access" in why, (kw, why)


# ---- AMQP: what the claims allow ----

def reader_gets(env, address, bodies, sender_roles):
    """A reader's token receives `bodies` that a token with `sender_roles`
    sends to `address`: all of them, in order, each accepted."""
    login = dict(user="device-1@tenant-a", allowed_mechs="PLAIN")
    rcv = logged_in(Recv(env.router.url, address, len(bodies)), password=env.token(roles=["reader"]), **login)
    snd = logged_in(Send(env.router.url, address, bodies,
                         wait_for=lambda: rcv.link and rcv.link.state & Endpoint.REMOTE_ACTIVE),
                    password=env.token(roles=sender_roles), **login)
    run(rcv, snd)
    assert rcv.got == bodies
    assert snd.outcomes == [Delivery.ACCEPTED] * len(bodies)


def test_a_reader_receives_but_cannot_send(env, amqp):
    reader = amqp(env.token(roles=["reader"], sub="reader-1"))
    assert refused_attach(reader.create_sender, "inbox") == "amqp:unauthorized-access"
    assert refused_attach(reader.create_sender, "orders/eu") == "amqp:unauthorized-access"
    reader.close()
    reader_gets(env, "inbox", ["for the reader %d" % i for i in range(4)], sender_roles=["app"])


def test_a_writer_sends_only_to_its_pattern_and_receives_nothing(env, amqp):
    writer = amqp(env.token(roles=["writer"], sub="writer-1"))
    assert refused_attach(writer.create_sender, "inbox") == "amqp:unauthorized-access"
    assert refused_attach(writer.create_sender, "audit") == "amqp:unauthorized-access"
    assert refused_attach(lambda a: writer.create_receiver(a, credit=1), "orders/eu") == "amqp:unauthorized-access"
    writer.close()
    reader_gets(env, "orders/eu", ["order %d" % i for i in range(3)], sender_roles=["writer"])


def test_a_token_no_rule_matches_may_do_nothing(env, amqp):
    c = amqp(env.token(roles=["guest"]))
    assert refused_attach(c.create_sender, "inbox") == "amqp:unauthorized-access"
    assert refused_attach(lambda a: c.create_receiver(a, credit=1), "inbox") == "amqp:unauthorized-access"
    c.close()
    c = amqp(env.token(roles=None))
    assert refused_attach(lambda a: c.create_receiver(a, credit=1), "inbox") == "amqp:unauthorized-access"
    c.close()


# ---- AMQP: revocation and expiry ----

def test_a_revoked_token_id_is_refused_and_its_live_connection_closed(env, amqp):
    revoked = env.token(jti="revoked-%d" % time.time_ns())
    kept = env.token()
    c1 = amqp(revoked)
    c1.create_receiver("inbox", credit=1)
    c2 = amqp(kept)
    s = env.console.expect("GET", "/api/v1/addressspaces/tenant-a")
    s["spec"]["authentication"]["oidc"]["revokedTokenIds"] = [decode_part(revoked, 1)["jti"]]
    env.console.expect("PUT", "/api/v1/addressspaces/tenant-a", {"metadata": s["metadata"], "spec": s["spec"]})
    e = wait_closed(c1, TIMEOUT)
    assert e.condition == "amqp:unauthorized-access", e
    assert "revoked" in str(e), e
    why = refusal(env.router.url, revoked)
    assert why is not None and "amqp:unauthorized-access" in why, why
    # Another token of the same subject goes on, on its open connection and a new one.
    got, sent = round_trip(c2, "inbox", 2)
    assert got == sent
    c2.close()
    c3 = amqp(env.token())
    assert round_trip(c3, "inbox", 1)[0] == ["inbox 0", "marker"]
    c3.close()


def test_a_connection_is_closed_when_its_token_expires(env, amqp):
    tok = env.token(lifetime=SHORT)
    exp = decode_part(tok, 1)["exp"]
    c = amqp(tok)
    keeper = amqp(env.token())
    got, sent = round_trip(c, "inbox", 2)
    assert got == sent
    c.create_receiver("inbox", credit=5)
    e = wait_closed(c, SHORT + SKEW + TIMEOUT)
    closed_at = time.time()
    assert e.condition == "amqp:unauthorized-access", e
    assert "expired" in str(e), e
    # At exp + skew: not before (within exp's one-second granularity), and
    # not long after.
    assert exp + SKEW - 1 <= closed_at <= exp + SKEW + 2, (closed_at - exp, SKEW)
    # From then on the token opens nothing: logins in the next second (a
    # client reconnecting at once) are all refused.
    until_ = time.monotonic() + 1.2
    while time.monotonic() < until_:
        why = refusal(env.router.url, tok)
        assert why is not None and "amqp:unauthorized-access" in why, \
            "the token was accepted again %.3f s after exp, after its connection was closed for expiry" \
            % (time.time() - exp)
    # The other connection is untouched.
    got, sent = round_trip(keeper, "inbox", 2)
    assert got == sent
    keeper.close()


# ---- keys: inline, a username claim ----

def test_a_space_with_an_inline_jwks_fetches_nothing(env, amqp):
    key = env.issuer.add_key("EdDSA")  # never published by the issuer
    env.console.expect("POST", "/api/v1/addressspaces", space("tenant-c", {
        "issuer": env.issuer.issuer, "audience": AUDIENCE, "clockSkewSeconds": SKEW,
        "jwks": {"keys": [key.jwk(with_alg=False)]}, "authorization": RULES[:1]}), 201)
    address(env.console, "tenant-c", "inbox", "inbox")
    fetches = env.issuer.fetches()
    tok = env.token(kid=key.kid, tenant="tenant-c")
    until("the router to take tenant-c's tokens",
          lambda: attach_ok(env.router.url, tok, "inbox", user="device-1@tenant-c"))
    c = amqp(tok, user="device-1@tenant-c")
    got, sent = round_trip(c, "inbox", 3)
    assert got == sent
    c.close()
    # The issuer's published keys are not tenant-c's.
    why = refusal(env.router.url, env.token(tenant="tenant-c"), user="device-1@tenant-c")
    assert why is not None and "amqp:unauthorized-access" in why, why
    assert env.issuer.fetches() == fetches


def test_the_username_must_equal_the_username_claim(env, amqp, clients):
    env.ready_b()
    tok = env.token_b()
    c = amqp(tok, user="meter-7@tenant-b")
    assert round_trip(c, "inbox", 1)[0] == ["inbox 0", "marker"]
    c.close()
    why = refusal(env.router.url, tok, user="someone-else@tenant-b")
    assert why is not None and "amqp:unauthorized-access" in why, why
    until("the gateway to take tenant-b's tokens", lambda: mqtt_ok(env.gateway.port, tok, "meter-7@tenant-b"))
    with pytest.raises(Refused) as e:
        clients(env.gateway.port, user="someone-else@tenant-b", password=tok)
    assert e.value.code in (0x86, 0x87), e.value.code


def test_a_space_reads_its_keys_from_a_jwks_file_that_may_change(start_router, config_file, tmpdir_path):
    # Air-gapped: the router reads the JWKS from a file in its --jwks-dir
    # (on Kubernetes a Secret mounted there), and reads it again when a
    # token names a key it lacks, so a changed file rotates the keys.
    issuer = Issuer()
    try:
        jwks_dir = os.path.join(tmpdir_path, "jwks")
        os.makedirs(jwks_dir)
        path = os.path.join(jwks_dir, "plant.json")
        with open(path, "w") as f:
            json.dump(issuer.jwks(), f)
        r = start_router("--config", config_file("""
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: plant}
spec:
  undeclaredAddresses: anycast
  authentication:
    oidc:
      issuer: %s
      audience: %s
      jwksFile: plant.json
      authorization: [{claim: roles, value: app, addresses: ["#"], operations: [send, recv]}]
""" % (issuer.issuer, AUDIENCE)), "--jwks-dir", jwks_dir)
        c = plain(r.url, issuer.token(tenant="plant", roles=["app"]), "device-1@plant")
        assert round_trip(c, "inbox", 2)[0] == ["inbox 0", "inbox 1", "marker"]
        c.close()
        assert issuer.fetches() == 0, "nothing fetched from the issuer"
        new_kid = issuer.rotate("EdDSA")
        with open(path + ".new", "w") as f:
            json.dump(issuer.jwks(), f)
        os.replace(path + ".new", path)
        # The new key is read within the refetch window (a real wait: the
        # router rereads for an unknown kid at most every 10 s).
        deadline = time.monotonic() + REFETCH_WINDOW + TIMEOUT
        while refusal(r.url, issuer.token(kid=new_kid, tenant="plant", roles=["app"]), "device-1@plant"):
            assert time.monotonic() < deadline, "the changed file was not read"
            time.sleep(0.1)
    finally:
        issuer.stop()


def test_a_token_user_finds_its_durable_subscription_by_link_name(env):
    # JMS's unsubscribe by link name alone, through the router to the
    # broker, which authorizes it by the token's claims.
    from proton.reactor import DurableSubscription
    from test_broker import leave
    c = plain(env.router.url, env.token(), container_id="jms-token")
    leave(c, c.create_receiver("sensors/jms", name="ticker", credit=10, options=DurableSubscription()))
    # A token whose claims grant no receive finds nothing it may take.
    c = plain(env.router.url, env.token(roles=["writer"]), container_id="jms-token")
    with pytest.raises(LinkDetached):
        c.create_receiver(None, name="ticker", credit=0)
    c.close()
    c = plain(env.router.url, env.token(), container_id="jms-token")
    found = c.create_receiver(None, name="ticker", credit=0)
    assert found.link.remote_source.address == "sensors/jms"
    found.close()  # a closing detach deletes the subscription
    with pytest.raises(LinkDetached):
        c.create_receiver(None, name="ticker", credit=0)
    c.close()


# ---- MQTT (paho) ----

@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
def test_mqtt_token_as_password_publishes_and_subscribes(env, clients, v5):
    sub = clients(env.gateway.port, v5=v5, user="meter@tenant-a", password=env.token(kid=list(env.issuer.keys)[1]))
    assert sub.subscribe("sensors/#", 1) == [1]
    # No space in the username: the tenant claim names it.
    pub = clients(env.gateway.port, v5=v5, user="meter", password=env.token(kid=list(env.issuer.keys)[2]))
    for i in range(3):
        assert pub.publish("sensors/t%d" % i, b"%d" % i, qos=1) == 0
    pub.publish("sensors/end", b"end", qos=1)
    got = [m.payload for m in sub.receive_n(4)]
    assert got == [b"0", b"1", b"2", b"end"]
    assert sub.nothing_more()


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
def test_a_token_users_will_goes_out_once_when_its_connection_is_lost(env, clients, v5):
    # The last-will service keeps the will with the token's claims and, when
    # the connection is lost, publishes it under the rules they map to.
    topic = "sensors/gone-%s" % ("5" if v5 else "3")
    sub = clients(env.gateway.port, user="meter@tenant-a", password=env.token())
    assert sub.subscribe(topic, 1) == [1]
    dev = clients(env.gateway.port, v5=v5, client_id="will-" + topic[-1], user="meter@tenant-a",
                  password=env.token(), will=(topic, b"gone", 1))
    assert dev.publish(topic, b"alive", qos=1) == 0
    assert [m.payload for m in sub.receive_n(1)] == [b"alive"]
    dev.drop()
    assert [m.payload for m in sub.receive_n(1)] == [b"gone"]
    assert sub.nothing_more()


TOKEN_WILL = """
import os, sys
from proton import Message
from proton.utils import BlockingConnection
url, token, to = sys.argv[1:4]
c = BlockingConnection(url, timeout=10, user="device-1@tenant-a", password=token, allowed_mechs="PLAIN")
# Accepted once the service holds it on disk, authorized by the token's claims.
c.create_sender("$lwt").send(Message(address=to, body="amqp gone", annotations={"x-opt-will-delay": 0}))
os._exit(0)  # no Close: the connection is lost
"""


def test_an_amqp_token_users_will_goes_out_when_its_connection_is_lost(env, clients):
    sub = clients(env.gateway.port, user="meter@tenant-a", password=env.token())
    assert sub.subscribe("sensors/amqp-gone", 1) == [1]
    subprocess.run([sys.executable, "-c", TOKEN_WILL, env.router.url, env.token(), "sensors/amqp-gone"],
                   check=True, timeout=TIMEOUT * 2)
    assert [m.payload for m in sub.receive_n(1)] == [b"amqp gone"]
    # A token whose rules do not let it send there: the will is refused.
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "-c", TOKEN_WILL, env.router.url, env.token(roles=["writer"]),
                        "sensors/amqp-gone"], check=True, timeout=TIMEOUT * 2, capture_output=True)
    assert sub.nothing_more()


def test_a_token_may_not_leave_a_will_where_its_rules_do_not_let_it_send(env, clients):
    with pytest.raises(Refused) as e:
        clients(env.gateway.port, v5=True, user="meter@tenant-a", password=env.token(roles=["writer"]),
                will=("sensors/gone", b"gone", 1))
    assert e.value.code == 0x87, e.value.code


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5.0"])
def test_mqtt_with_a_bad_token_gets_a_refusing_connack(env, clients, v5):
    for case in ("expired", "tampered", "wrong tenant", "alg none", "HS256 with the public key"):
        with pytest.raises(Refused) as e:
            clients(env.gateway.port, v5=v5, user="meter@tenant-a", password=forged(env, case))
        # 3.1.1 return codes 4 and 5 reach paho as 0x86 and 0x87.
        assert e.value.code in (0x86, 0x87), (case, e.value.code)


def auth_props(method, data):
    p = Properties(PacketTypes.CONNECT)
    p.AuthenticationMethod = method
    p.AuthenticationData = data
    return p


@pytest.mark.parametrize("method", ["OAUTHBEARER", "JWT"])
def test_mqtt5_enhanced_authentication_with_a_token(env, clients, method):
    sub = clients(env.gateway.port, v5=True, connect_props=auth_props(method, env.token().encode()))
    assert sub.connack_props.AuthenticationMethod == method
    assert sub.subscribe("sensors/#", 1) == [1]
    pub = clients(env.gateway.port, v5=True, connect_props=auth_props(method, env.token().encode()))
    pub.publish("sensors/enhanced", b"with a token", qos=1)
    assert sub.receive().payload == b"with a token"
    with pytest.raises(Refused) as e:
        clients(env.gateway.port, v5=True, connect_props=auth_props(method, env.token(lifetime=-120).encode()))
    assert e.value.code in (0x86, 0x87), e.value.code
    with pytest.raises(Refused) as e:
        clients(env.gateway.port, v5=True, connect_props=auth_props("SCRAM-SHA-1", b"n,,n=user,r=abc"))
    assert e.value.code == 0x8C, e.value.code


def test_mqtt_connections_are_closed_when_their_token_expires(env, clients):
    tok = env.token(lifetime=SHORT)
    exp = decode_part(tok, 1)["exp"]
    c3 = clients(env.gateway.port, user="meter@tenant-a", password=tok)
    c5 = clients(env.gateway.port, v5=True, user="meter@tenant-a", password=tok)
    reasons = []
    on_disconnect = c5.c.on_disconnect

    def record(c, u, flags, rc, props):
        reasons.append(rc.value if rc is not None else None)
        on_disconnect(c, u, flags, rc, props)
    c5.c.on_disconnect = record
    keeper = clients(env.gateway.port, v5=True, user="meter@tenant-a", password=env.token())
    for c in (c3, c5, keeper):
        assert c.subscribe("sensors/#", 1) == [1]
    assert c3.disconnected.wait(SHORT + SKEW + TIMEOUT), "3.1.1 client still connected"
    assert c5.disconnected.wait(TIMEOUT), "5.0 client still connected"
    closed_at = time.time()
    assert exp + SKEW - 1 <= closed_at <= exp + SKEW + 2, (closed_at - exp, SKEW)
    assert reasons and reasons[0] == 0x87, reasons
    keeper.publish("sensors/after", b"still here", qos=1)
    assert keeper.receive().payload == b"still here"


# ---- keys: an unknown kid, rotation ----

def test_an_unknown_kid_is_refused_after_one_fetch_of_the_keys(env, amqp):
    wait_refetch_window(env.issuer)
    before = env.issuer.fetches()
    why = refusal(env.router.url, env.issuer.with_unknown_kid(roles=["app"]))
    assert why is not None and "amqp:unauthorized-access" in why, why
    assert env.issuer.fetches() == before + 1, "the keys were not fetched again for an unknown kid"
    # More unknown kids at once: no more fetches (rate limited), all refused.
    for _ in range(3):
        why = refusal(env.router.url, env.issuer.with_unknown_kid(roles=["app"]))
        assert why is not None and "amqp:unauthorized-access" in why, why
    assert env.issuer.fetches() == before + 1
    # The known keys still serve.
    c = amqp(env.token())
    assert round_trip(c, "inbox", 1)[0] == ["inbox 0", "marker"]
    c.close()


def test_key_rotation_new_tokens_work_without_a_restart(env, amqp):
    issuer = env.second
    env.ready_b()
    old = env.token_b()
    c = amqp(old, user="meter-7@tenant-b")
    c.close()
    wait_refetch_window(issuer)
    fetched = issuer.fetches()
    new_kid = issuer.rotate("ES256")
    new = env.token_b()
    assert decode_part(new, 0)["kid"] == new_kid
    c = amqp(new, user="meter-7@tenant-b")
    got, sent = round_trip(c, "inbox", 3)
    assert got == sent
    c.close()
    assert issuer.fetches() == fetched + 1
    # The retired key no longer signs anything the space takes.
    why = refusal(env.router.url, env.token_b(kid=decode_part(old, 0)["kid"]), user="meter-7@tenant-b")
    assert why is not None and "amqp:unauthorized-access" in why, why


# ---- metrics ----

def test_token_decisions_are_counted_on_metrics(env, amqp):
    port, admin = env.router.ports["http"], env.console.token
    before = token_auth_counts(port, admin)
    amqp(env.token()).close()
    for tok in (env.token(lifetime=-120), env.issuer.unsigned()):
        assert refusal(env.router.url, tok) is not None
    after = token_auth_counts(port, admin)
    assert after.get("accepted", 0) - before.get("accepted", 0) == 1, (before, after)
    assert after.get("refused", 0) - before.get("refused", 0) == 2, (before, after)
    port = env.gateway.ports["http"]
    before = token_auth_counts(port, admin)
    assert mqtt_ok(env.gateway.port, env.token(), "meter@tenant-a")
    assert mqtt_ok(env.gateway.port, env.token(lifetime=-120), "meter@tenant-a") is None
    after = token_auth_counts(port, admin)
    assert after.get("accepted", 0) - before.get("accepted", 0) == 1, (before, after)
    assert after.get("refused", 0) - before.get("refused", 0) == 1, (before, after)


# ---- the console ----

def api(console, token, method, path, body=None):
    """(status, JSON body or None) of one call with `token` (or none)."""
    return console.api(method, path, body, token=token)


def addr_body(name):
    return {"metadata": {"name": name}, "spec": {"address": name, "type": "anycast"}}


def names(doc):
    return sorted(i["metadata"]["name"] for i in doc["items"])


@pytest.fixture
def oidc_console(tmpdir_path):
    issuer = Issuer(realm="/realms/ops", algs=("RS256", "ES256"))
    console = None
    try:
        console = Console(os.path.join(tmpdir_path, "console"), "--oidc-issuer", issuer.issuer,
                          "--oidc-audience", AUDIENCE)
        for s in ("tenant-a", "tenant-b"):
            console.expect("POST", "/api/v1/addressspaces",
                           {"metadata": {"name": s}, "spec": {"authentication": {"anonymous": False}}}, 201)
            console.expect("POST", "/api/v1/addressspaces/%s/addresses" % s, addr_body("orders"), 201)
        yield console, issuer
    finally:
        if console is not None:
            console.stop()
        issuer.stop()


def console_token(issuer, sub, roles, **kw):
    # A console user's token names no tenant.
    return issuer.token(sub=sub, roles=roles, tenant=None, **kw)


def test_console_login_settings_come_from_the_issuers_discovery(oidc_console):
    console, issuer = oidc_console
    status, doc = api(console, None, "GET", "/api/v1/auth")
    assert status == 200, doc
    assert doc["oidc"]["issuer"] == issuer.issuer
    assert doc["oidc"]["clientId"] == AUDIENCE
    assert doc["oidc"]["authorizationEndpoint"] == issuer.base + "/authorize"
    assert doc["oidc"]["tokenEndpoint"] == issuer.base + "/token"
    assert "openid" in doc["oidc"]["scope"].split()


def test_a_console_viewer_reads_its_space_and_changes_nothing(oidc_console):
    console, issuer = oidc_console
    viewer = console_token(issuer, "viewer-1", ["viewer:tenant-a"])
    status, doc = api(console, viewer, "GET", "/api/v1/whoami")
    assert status == 200, doc
    assert (doc["subject"], doc["admin"], doc["editor"], doc["viewer"]) == ("viewer-1", False, [], ["tenant-a"]), doc
    status, doc = api(console, viewer, "GET", "/api/v1/addressspaces/tenant-a/addresses")
    assert status == 200 and names(doc) == ["orders"], (status, doc)
    status, doc = api(console, viewer, "GET", "/api/v1/addressspaces")
    assert status == 200 and names(doc) == ["tenant-a"], (status, doc)
    for method, path, body in [
        ("POST", "/api/v1/addressspaces/tenant-a/addresses", addr_body("more")),
        ("PUT", "/api/v1/addressspaces/tenant-a/addresses/orders", addr_body("orders")),
        ("DELETE", "/api/v1/addressspaces/tenant-a/addresses/orders", None),
        ("DELETE", "/api/v1/addressspaces/tenant-a", None),
        ("GET", "/api/v1/addressspaces/tenant-b/addresses", None),
        ("GET", "/api/v1/addressspaces/tenant-b", None),
        ("GET", "/api/v1/brokers", None),
    ]:
        status, doc = api(console, viewer, method, path, body)
        assert status == 403, (method, path, status, doc)
        # The API's error shape (a Status with `reason`), or the contract's `error`.
        assert doc and "Forbidden" in (doc.get("reason"), doc.get("error")), (method, path, doc)
    # Nothing changed.
    assert names(console.expect("GET", "/api/v1/addressspaces/tenant-a/addresses")) == ["orders"]


def test_a_console_editor_changes_only_inside_its_space(oidc_console):
    console, issuer = oidc_console
    editor = console_token(issuer, "editor-1", ["editor:tenant-a"], kid=list(issuer.keys)[1])
    status, doc = api(console, editor, "POST", "/api/v1/addressspaces/tenant-a/addresses", addr_body("returns"))
    assert status == 201, doc
    status, doc = api(console, editor, "POST", "/api/v1/addressspaces/tenant-b/addresses", addr_body("returns"))
    assert status == 403, doc
    s = console.expect("GET", "/api/v1/addressspaces/tenant-a")
    status, doc = api(console, editor, "PUT", "/api/v1/addressspaces/tenant-a",
                      {"metadata": s["metadata"], "spec": s["spec"]})
    assert status == 403, doc
    for method, path, body in [
        ("DELETE", "/api/v1/addressspaces/tenant-a", None),
        ("POST", "/api/v1/addressspaces", {"metadata": {"name": "tenant-e"}, "spec": {}}),
        ("GET", "/api/v1/overview", None),
    ]:
        status, doc = api(console, editor, method, path, body)
        assert status == 403, (method, path, status, doc)
    status, doc = api(console, editor, "GET", "/api/v1/addressspaces")
    assert status == 200 and names(doc) == ["tenant-a"], doc
    status, doc = api(console, editor, "DELETE", "/api/v1/addressspaces/tenant-a/addresses/returns")
    assert status == 200, doc
    assert names(console.expect("GET", "/api/v1/addressspaces/tenant-a/addresses")) == ["orders"]
    assert names(console.expect("GET", "/api/v1/addressspaces/tenant-b/addresses")) == ["orders"]


def test_console_admin_role_bad_tokens_and_the_break_glass_token(oidc_console):
    console, issuer = oidc_console
    admin = console_token(issuer, "ops-1", ["admin"])
    status, doc = api(console, admin, "POST", "/api/v1/addressspaces",
                      {"metadata": {"name": "tenant-c"}, "spec": {"authentication": {"anonymous": False}}})
    assert status == 201, doc
    status, doc = api(console, admin, "GET", "/api/v1/addressspaces")
    assert status == 200, doc
    assert names(doc) in (["default", "tenant-a", "tenant-b", "tenant-c"], ["tenant-a", "tenant-b", "tenant-c"]), doc
    assert api(console, admin, "GET", "/api/v1/brokers")[0] == 200
    assert api(console, admin, "DELETE", "/api/v1/addressspaces/tenant-c")[0] == 200
    status, doc = api(console, admin, "GET", "/api/v1/whoami")
    assert status == 200 and doc["admin"] is True and doc["subject"] == "ops-1", doc
    # Bad tokens: 401, whatever roles they claim.
    other = Issuer(realm="/realms/ops", algs=("RS256",))
    try:
        for bad in [
            Issuer.tampered(console_token(issuer, "viewer-2", ["viewer:tenant-a"]), roles=["admin"]),
            console_token(issuer, "ops-1", ["admin"], lifetime=-120),
            console_token(issuer, "ops-1", ["admin"], aud="someone-else"),
            issuer.unsigned(sub="ops-1", roles=["admin"], tenant=None),
            issuer.hs256_with_public_key(sub="ops-1", roles=["admin"], tenant=None),
            # Same issuer URL, a key the issuer never published.
            other.token(sub="ops-1", roles=["admin"], tenant=None, iss=issuer.issuer),
            "not-a-token",
        ]:
            status, doc = api(console, bad, "GET", "/api/v1/addressspaces")
            assert status == 401, (status, doc)
    finally:
        other.stop()
    # The admin token still opens everything.
    status, doc = api(console, console.token, "GET", "/api/v1/whoami")
    assert status == 200 and doc["admin"] is True and doc["subject"] == "admin", doc
    assert names(console.expect("GET", "/api/v1/addressspaces")) in (
        ["default", "tenant-a", "tenant-b"], ["tenant-a", "tenant-b"])
    console.expect("POST", "/api/v1/addressspaces/tenant-b/addresses", addr_body("by-admin"), 201)
