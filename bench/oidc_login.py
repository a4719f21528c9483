#!/usr/bin/env python3
"""Time to check a token and accept a connection (issue #16).

    bench/oidc_login.py [N]          (default 2000 logins per kind)

Starts `flotilla console` and a router that follows it (release build;
FLOTILLA_BIN to override) on free ports in a temp dir, with one address
space that trusts an issuer served here (a real HTTP JWKS, so the keys are
fetched once and then cached) and has a MessagingUser (its password kept
as SCRAM keys, PBKDF2-SHA-256 with 4096 iterations, checked on PLAIN).

Each login is a fresh TCP connection: the AMQP SASL header, the server's
mechanisms, our sasl-init, its outcome. The time is from connect() to the
outcome `ok` (the server's TCP accept, its handshake and its check of the
credentials), one login at a time, for:

- PLAIN with the user's password (SCRAM-stored keys);
- PLAIN with an EdDSA token as the password;
- OAUTHBEARER with an EdDSA token, an ES256 token and an RS256 token.

Reports p50 and p99 of each, and how many of the issuer's JWKS fetches the
whole run caused. The router's connection-rate limit is lifted for the run.
Needs the `cryptography` package."""

import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "interop"))
from oidc_issuer import AUDIENCE, Issuer  # noqa: E402  (the tests' issuer: keys, JWKS over HTTP, signing)

sys.path.insert(0, os.path.dirname(__file__))
from console_scale import Api, follow_args, pct, start  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
SPACE = "tokens"


def symbol(s):
    b = s.encode()
    return bytes([0xA3, len(b)]) + b


def binary(b):
    return bytes([0xB0]) + struct.pack(">I", len(b)) + b


def string(s):
    b = s.encode()
    return bytes([0xA1, len(b)]) + b


def sasl_init(mechanism, response, hostname):
    """A SASL frame carrying sasl-init (AMQP 1.0 §5.3.3.2)."""
    fields = symbol(mechanism) + binary(response) + string(hostname)
    body = bytes([0x00, 0x53, 0x41, 0xD0]) + struct.pack(">II", len(fields) + 4, 3) + fields
    return struct.pack(">IBBH", 8 + len(body), 2, 1, 0) + body


def read_frame(s):
    head = b""
    while len(head) < 4:
        chunk = s.recv(4 - len(head))
        if not chunk:
            raise RuntimeError("closed")
        head += chunk
    size = struct.unpack(">I", head)[0]
    rest = b""
    while len(rest) < size - 4:
        chunk = s.recv(size - 4 - len(rest))
        if not chunk:
            raise RuntimeError("closed")
        rest += chunk
    return head + rest


def login(port, mechanism, response):
    """Seconds from connect() to the SASL outcome; raises unless ok."""
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        s.sendall(b"AMQP\x03\x01\x00\x00")
        got = b""
        while len(got) < 8:
            got += s.recv(8 - len(got))
        read_frame(s)  # sasl-mechanisms
        s.sendall(sasl_init(mechanism, response, SPACE))
        outcome = read_frame(s)
        took = time.perf_counter() - t0
        # The outcome's code: the first field of the list after 0x00 0x53 0x44.
        i = outcome.index(b"\x00\x53\x44") + 3
        code = outcome[i + (4 if outcome[i] == 0xC0 else 10)] if outcome[i] in (0xC0, 0xD0) else None
        if code != 0:
            raise RuntimeError(f"{mechanism}: outcome {outcome[i:i + 12].hex()}")
        return took
    finally:
        s.close()


def main():
    tmp = tempfile.mkdtemp()
    procs = []
    issuer = Issuer()
    try:
        console, caddr = start(
            ["console", "--http", "127.0.0.1:0", "--data-dir", f"{tmp}/console"],
            r'proto="http" addr=(\S+)')
        procs.append(console)
        token_file = f"{tmp}/console/admin-token"
        token = open(token_file).read().strip()
        router, raddr = start(
            ["router", "--amqp", "127.0.0.1:0", "--max-connection-rate", "0",
             *follow_args(tmp, caddr, token_file)],
            r'proto="amqp" addr=(\S+)')
        procs.append(router)
        port = int(raddr.rsplit(":", 1)[1])
        api = Api(caddr, token)
        api.call("POST", "/addressspaces", {"metadata": {"name": SPACE}, "spec": {"authentication": {
            "oidc": {"issuer": issuer.issuer, "audience": AUDIENCE, "authorization": [
                {"claim": "roles", "value": "app", "addresses": ["#"], "operations": ["send", "recv"]}]}}}})
        api.call("POST", f"/addressspaces/{SPACE}/users", {"metadata": {"name": "app"}, "spec": {
            "username": "app", "password": "a-long-password-for-bench",
            "authorization": [{"addresses": ["#"], "operations": ["send", "recv"]}]}})

        kid = {k.alg: k.kid for k in issuer.keys.values()}

        def tok(alg):
            return issuer.token(kid=kid[alg], tenant=SPACE, lifetime=3600, sub="bench", roles=["app"])

        kinds = [
            ("PLAIN, password (SCRAM-stored keys)", "PLAIN", b"\0app\0a-long-password-for-bench"),
            ("PLAIN, EdDSA token as the password", "PLAIN", b"\0bench\0" + tok("EdDSA").encode()),
            ("OAUTHBEARER, EdDSA token", "OAUTHBEARER", f"n,,\x01auth=Bearer {tok('EdDSA')}\x01\x01".encode()),
            ("OAUTHBEARER, ES256 token", "OAUTHBEARER", f"n,,\x01auth=Bearer {tok('ES256')}\x01\x01".encode()),
            ("OAUTHBEARER, RS256 token", "OAUTHBEARER", f"n,,\x01auth=Bearer {tok('RS256')}\x01\x01".encode()),
        ]
        # The space reaches the router: the first token login then works.
        deadline = time.monotonic() + 20
        while True:
            try:
                login(port, kinds[1][1], kinds[1][2])
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        print(f"{N} logins per kind, one at a time, connect() to SASL outcome; router {raddr}")
        print(f"{'login':40} {'p50 ms':>8} {'p99 ms':>8}")
        for name, mech, resp in kinds:
            for _ in range(50):
                login(port, mech, resp)
            xs = [login(port, mech, resp) for _ in range(N)]
            print(f"{name:40} {pct(xs, 0.5) * 1000:8.3f} {pct(xs, 0.99) * 1000:8.3f}")
        print(f"the issuer's JWKS was fetched {issuer.fetches()} time(s)")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        issuer.stop()


if __name__ == "__main__":
    main()
