// A tiny OpenID Connect issuer for tests: a P-256 key it makes itself,
// its discovery document, its JWKS, an authorization endpoint that asks
// nobody anything (it sends the browser straight back with a code for the
// user the test names), and a token endpoint that checks the PKCE verifier
// (RFC 7636, S256 only) and signs an ES256 access token by hand. The
// console's origin may call the token endpoint and read the discovery
// document (CORS).
import { createServer } from 'node:http';
import { createHash, generateKeyPairSync, randomBytes, sign } from 'node:crypto';

const b64url = (buf) => Buffer.from(buf).toString('base64url');

/** base64url(SHA-256(verifier)): RFC 7636 §4.2, S256. */
export function challengeOf(verifier) {
  return b64url(createHash('sha256').update(verifier, 'ascii').digest());
}

/** A code verifier: 64 characters of base64url (RFC 7636 §4.1). */
export function newVerifier() {
  return b64url(randomBytes(48));
}

/** A P-256 key pair with a kid, and its public half as a JWK. */
export function newKey() {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const kid = `k-${randomBytes(4).toString('hex')}`;
  return { kid, privateKey, jwk: { ...publicKey.export({ format: 'jwk' }), kid, alg: 'ES256', use: 'sig' } };
}

/** A JWT signed with `key` (ES256: the raw r||s signature, RFC 7518 §3.4). */
export function signJwt(key, claims) {
  const input = `${b64url(JSON.stringify({ alg: 'ES256', kid: key.kid, typ: 'JWT' }))}.${b64url(JSON.stringify(claims))}`;
  const sig = sign('sha256', Buffer.from(input), { key: key.privateKey, dsaEncoding: 'ieee-p1363' });
  return `${input}.${b64url(sig)}`;
}

/**
 * Starts the issuer on 127.0.0.1 (a port the system picks). `audience`
 * goes into each token's aud, `clientId` is the only client it knows.
 * Set `user` ({sub, roles, expiresIn} or {deny: 'why'}) before a sign-in
 * and `origin` (the console's) for CORS.
 */
export async function startIssuer({ audience, clientId }) {
  const key = newKey();
  const codes = new Map();
  const server = createServer();
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const url = `http://127.0.0.1:${server.address().port}`;
  const issuer = {
    url,
    key,
    audience,
    clientId,
    origin: null,
    user: { sub: 'nobody', roles: [] },
    /** Every authorization request's query, in order. */
    authorizations: [],
    /** Every token request: its form, status and error. */
    exchanges: [],
    /** A token for `user` as the token endpoint would make it. */
    token: (user, extra = {}) => {
      const now = Math.floor(Date.now() / 1000);
      return signJwt(key, {
        iss: url, aud: audience, sub: user.sub, iat: now, nbf: now,
        exp: now + (user.expiresIn ?? 300), roles: user.roles || [], ...extra,
      });
    },
    close: () => new Promise((resolve) => { server.closeAllConnections(); server.close(resolve); }),
  };

  const cors = () => (issuer.origin ? {
    'Access-Control-Allow-Origin': issuer.origin,
    'Access-Control-Allow-Methods': 'GET, POST',
    'Access-Control-Allow-Headers': 'Content-Type, Authorization',
    'Access-Control-Max-Age': '600',
    Vary: 'Origin',
  } : {});
  const json = (res, status, body, headers = {}) => {
    res.writeHead(status, { 'Content-Type': 'application/json', 'Cache-Control': 'no-store', ...headers });
    res.end(JSON.stringify(body));
  };
  const redirect = (res, to, params) => {
    const u = new URL(to);
    for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null) u.searchParams.set(k, v);
    res.writeHead(302, { Location: u.toString(), 'Cache-Control': 'no-store' });
    res.end();
  };

  server.on('request', (req, res) => {
    handle(req, res).catch((e) => {
      if (!res.headersSent) json(res, 500, { error: 'server_error', error_description: String(e) });
      else res.destroy();
    });
  });
  async function handle(req, res) {
    const u = new URL(req.url, url);
    if (req.method === 'OPTIONS') {
      res.writeHead(204, cors());
      res.end();
      return;
    }
    if (req.method === 'GET' && u.pathname === '/.well-known/openid-configuration') {
      json(res, 200, {
        issuer: url,
        authorization_endpoint: `${url}/authorize`,
        token_endpoint: `${url}/token`,
        jwks_uri: `${url}/jwks`,
        response_types_supported: ['code'],
        grant_types_supported: ['authorization_code'],
        subject_types_supported: ['public'],
        id_token_signing_alg_values_supported: ['ES256'],
        code_challenge_methods_supported: ['S256'],
        token_endpoint_auth_methods_supported: ['none'],
        scopes_supported: ['openid'],
      }, cors());
      return;
    }
    if (req.method === 'GET' && u.pathname === '/jwks') {
      json(res, 200, { keys: [key.jwk] });
      return;
    }
    if (req.method === 'GET' && u.pathname === '/authorize') {
      const q = Object.fromEntries(u.searchParams);
      issuer.authorizations.push(q);
      // RFC 6749 §4.1.2.1: no redirect to a redirect_uri not trusted.
      let back = null;
      try { back = new URL(q.redirect_uri); } catch { /* not a URL */ }
      if (q.client_id !== clientId || !back || (issuer.origin && back.origin !== issuer.origin)) {
        json(res, 400, { error: 'invalid_request', error_description: 'unknown client or redirect_uri' });
        return;
      }
      const answer = (params) => redirect(res, q.redirect_uri, { ...params, state: q.state });
      if (q.response_type !== 'code') return answer({ error: 'unsupported_response_type' });
      if (q.code_challenge_method !== 'S256' || !/^[A-Za-z0-9_-]{43}$/.test(q.code_challenge || '')) {
        return answer({ error: 'invalid_request', error_description: 'PKCE with S256 is required' });
      }
      if (issuer.user.deny) return answer({ error: 'access_denied', error_description: issuer.user.deny });
      const code = b64url(randomBytes(24));
      codes.set(code, { challenge: q.code_challenge, redirectUri: q.redirect_uri, user: issuer.user, at: Date.now() });
      return answer({ code });
    }
    if (req.method === 'POST' && u.pathname === '/token') {
      let body = '';
      for await (const chunk of req) body += chunk;
      const f = Object.fromEntries(new URLSearchParams(body));
      const answer = (status, out) => {
        issuer.exchanges.push({ form: f, status, error: out.error });
        json(res, status, out, cors());
      };
      if (f.grant_type !== 'authorization_code') return answer(400, { error: 'unsupported_grant_type' });
      if (f.client_id !== clientId) return answer(401, { error: 'invalid_client' });
      const c = codes.get(f.code);
      // A code is for one try, right or wrong (RFC 6749 §4.1.2).
      codes.delete(f.code);
      if (!c || Date.now() - c.at > 60000) return answer(400, { error: 'invalid_grant', error_description: 'unknown or used code' });
      if (f.redirect_uri !== c.redirectUri) return answer(400, { error: 'invalid_grant', error_description: 'redirect_uri differs' });
      if (!/^[A-Za-z0-9._~-]{43,128}$/.test(f.code_verifier || '') || challengeOf(f.code_verifier) !== c.challenge) {
        return answer(400, { error: 'invalid_grant', error_description: 'code_verifier does not match the code_challenge' });
      }
      const expiresIn = c.user.expiresIn ?? 300;
      return answer(200, { access_token: issuer.token(c.user), token_type: 'Bearer', expires_in: expiresIn, scope: 'openid' });
    }
    json(res, 404, { error: 'not_found' });
  }
  return issuer;
}
