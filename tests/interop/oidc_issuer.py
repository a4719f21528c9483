"""A small, real OIDC issuer for the token tests (issue 16): signing keys
made here with `cryptography` (RSA 2048 for RS256, P-256 for ES256,
Ed25519 for EdDSA), a discovery document and a JWKS served over HTTP on
127.0.0.1 port 0 by a thread, and JWTs put together by hand so that a
test can also make the forged ones a server must refuse: `alg: none`,
HS256 keyed with the RSA public key's PEM, a tampered payload, an unknown
`kid`. It counts what it serves, so a test can see keys fetched again."""

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

AUDIENCE = "flotilla"


def b64url(data):
    """Base64url without padding (RFC 7515 §2)."""
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value):
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def _uint(n, size=None):
    """A big-endian unsigned integer, `size` bytes long if given (EC
    coordinates are fixed length), else as short as it goes."""
    if size is None:
        size = max(1, (n.bit_length() + 7) // 8)
    return n.to_bytes(size, "big")


class Key:
    """One signing key: its `kid`, `alg`, the private key, and its public
    JWK (RFC 7517, RFC 7518 §6, RFC 8037)."""

    def __init__(self, alg, kid=None):
        self.alg = alg
        self.kid = kid or "%s-%s" % (alg.lower(), uuid.uuid4().hex[:8])
        if alg == "RS256":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            nums = self.private.public_key().public_numbers()
            self.jwk_fields = {"kty": "RSA", "n": b64url(_uint(nums.n)), "e": b64url(_uint(nums.e))}
        elif alg == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
            nums = self.private.public_key().public_numbers()
            self.jwk_fields = {"kty": "EC", "crv": "P-256",
                               "x": b64url(_uint(nums.x, 32)), "y": b64url(_uint(nums.y, 32))}
        elif alg == "EdDSA":
            self.private = ed25519.Ed25519PrivateKey.generate()
            raw = self.private.public_key().public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw)
            self.jwk_fields = {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
        else:
            raise ValueError("no such algorithm here: %r" % alg)

    def jwk(self, with_alg=True):
        """The public JWK; without `alg` the server must go by `kty`."""
        j = dict(self.jwk_fields, kid=self.kid, use="sig")
        if with_alg:
            j["alg"] = self.alg
        return j

    def public_pem(self):
        """The public key as PEM (SubjectPublicKeyInfo), the bytes an
        attacker would use as an HMAC secret."""
        return self.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, data):
        if self.alg == "RS256":
            return self.private.sign(data, padding.PKCS1v15(), hashes.SHA256())
        if self.alg == "ES256":
            # JWS wants r || s, 32 bytes each (RFC 7518 §3.4), not DER.
            r, s = decode_dss_signature(self.private.sign(data, ec.ECDSA(hashes.SHA256())))
            return _uint(r, 32) + _uint(s, 32)
        return self.private.sign(data)


def jwt(header, claims, sign):
    """`header.payload.signature`, with `sign(signing_input) -> bytes`."""
    signing_input = (b64url_json(header) + "." + b64url_json(claims)).encode()
    return signing_input.decode() + "." + b64url(sign(signing_input))


def decode_part(token, i):
    """The JSON of part `i` (0 header, 1 claims) of a JWT."""
    part = token.split(".")[i]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


class Issuer:
    """An OIDC provider on 127.0.0.1 port 0. `issuer` is its issuer URL
    (`base` + `realm`); its discovery document is at
    ISSUER/.well-known/openid-configuration and its keys at `jwks_uri`
    (`base`/jwks). One key of each algorithm is made and published; the
    first (RS256) is the default signer. `stop()` ends the server."""

    def __init__(self, realm="/realms/test", algs=("RS256", "ES256", "EdDSA")):
        self.keys = {}
        self.published = []
        self.requests = []  # (monotonic time, path) of every GET
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.base = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.issuer = self.base + realm
        self.jwks_uri = self.base + "/jwks"
        self.discovery_path = realm + "/.well-known/openid-configuration"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.default_kid = None
        for alg in algs:
            k = self.add_key(alg)
            self.default_kid = self.default_kid or k.kid
        self.publish(*self.keys)

    # ---- keys ----

    def add_key(self, alg, kid=None):
        """Makes a key (not published until `publish` names it)."""
        k = Key(alg, kid)
        with self._lock:
            self.keys[k.kid] = k
        return k

    def publish(self, *kids, with_alg=True):
        """Makes the JWKS exactly the keys `kids`."""
        with self._lock:
            self.published = [(kid, with_alg) for kid in kids]

    def rotate(self, alg="RS256"):
        """A new key replaces every published one (and signs from now on
        by default); returns its kid."""
        k = self.add_key(alg)
        self.publish(k.kid)
        self.default_kid = k.kid
        return k.kid

    def jwks(self):
        with self._lock:
            return {"keys": [self.keys[kid].jwk(with_alg) for kid, with_alg in self.published]}

    def discovery(self):
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "authorization_endpoint": self.base + "/authorize",
            "token_endpoint": self.base + "/token",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
        }

    def fetches(self, path="/jwks"):
        """How many times `path` was fetched."""
        with self._lock:
            return sum(1 for _, p in self.requests if p == path)

    def last_fetch(self, path="/jwks"):
        """The monotonic time of the last fetch of `path`, or None."""
        with self._lock:
            times = [t for t, p in self.requests if p == path]
        return times[-1] if times else None

    # ---- tokens ----

    def claims(self, tenant="tenant-a", lifetime=300, **extra):
        """A token's claims: iss, aud, sub, iat, exp (now + `lifetime`),
        a jti and the tenant, then `extra` (None removes a claim)."""
        now = int(time.time())
        c = {"iss": self.issuer, "aud": AUDIENCE, "sub": "device-1", "iat": now, "exp": now + lifetime,
             "jti": uuid.uuid4().hex, "tenant": tenant}
        for k, v in extra.items():
            if v is None:
                c.pop(k, None)
            else:
                c[k] = v
        return c

    def token(self, kid=None, header=None, **claims):
        """A JWT signed by key `kid` (default: the current signer) with
        `claims(**claims)`; `header` entries are added to (or, as None,
        removed from) the JOSE header."""
        key = self.keys[kid or self.default_kid]
        h = {"alg": key.alg, "typ": "JWT", "kid": key.kid}
        for k, v in (header or {}).items():
            if v is None:
                h.pop(k, None)
            else:
                h[k] = v
        return jwt(h, self.claims(**claims), key.sign)

    def unsigned(self, **claims):
        """`alg: none` with an empty signature (RFC 7519 §6)."""
        h = {"alg": "none", "typ": "JWT", "kid": self.default_kid}
        return jwt(h, self.claims(**claims), lambda _: b"")

    def hs256_with_public_key(self, kid=None, **claims):
        """HS256 keyed with the RSA key's public PEM: the algorithm
        confusion a verifier that trusts the header's `alg` falls for."""
        key = self.keys[kid or self.default_kid]
        h = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
        secret = key.public_pem()
        return jwt(h, self.claims(**claims), lambda data: hmac.new(secret, data, hashlib.sha256).digest())

    @staticmethod
    def tampered(token, **changes):
        """`token` with its claims changed and its signature kept."""
        header, _, sig = token.split(".")
        claims = decode_part(token, 1)
        claims.update(changes)
        return header + "." + b64url_json(claims) + "." + sig

    def with_unknown_kid(self, **claims):
        """Signed by a key the issuer never published."""
        k = self.add_key("RS256", kid="never-published-" + uuid.uuid4().hex[:6])
        return self.token(kid=k.kid, **claims)

    # ---- HTTP ----

    def _handler(self):
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?", 1)[0]
                with issuer._lock:
                    issuer.requests.append((time.monotonic(), path))
                if path == issuer.discovery_path:
                    body = issuer.discovery()
                elif path == "/jwks":
                    body = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                raw = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        return Handler

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
