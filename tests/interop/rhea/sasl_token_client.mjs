// A rhea client that logs in with a bearer token, for the OIDC interop
// tests (tests/interop/test_oidc.py runs it; not a `node --test` file).
// SASL XOAUTH2 is rhea's own (`username` + `token`); OAUTHBEARER (RFC 7628)
// is a mechanism object given through rhea's `sasl_mechanisms` option.
//
// Argument: one JSON object {port, mechanism, token, user?, saslHostname?,
// hostname?, address, count}. It receives on `address`, sends `count`
// messages there once its receiver is attached, and prints one JSON line:
// {"received": [...], "accepted": N} or {"error": {"condition", "description"},
// "challenges": [...]} (OAUTHBEARER challenges the server sent, as text).
import rhea from 'rhea';

const TIMEOUT = 10000;
const opts = JSON.parse(process.argv[2]);
const challenges = [];

function oauthbearer(user, token) {
  return {
    start(callback) {
      const authzid = user ? `a=${user.replace(/=/g, '=3D').replace(/,/g, '=2C')}` : '';
      callback(undefined, Buffer.from(`n,${authzid},\x01auth=Bearer ${token}\x01\x01`));
    },
    // RFC 7628 §3.2.3: an error challenge is answered with a lone ^A.
    step(challenge, callback) {
      challenges.push(challenge ? Buffer.from(challenge).toString() : '');
      callback(undefined, Buffer.from([1]));
    },
  };
}

const options = { host: '127.0.0.1', port: opts.port, reconnect: false };
if (opts.saslHostname) options.sasl_init_hostname = opts.saslHostname;
if (opts.hostname) options.hostname = opts.hostname;
if (opts.mechanism === 'OAUTHBEARER') {
  options.sasl_mechanisms = { OAUTHBEARER: () => oauthbearer(opts.user, opts.token) };
} else if (opts.mechanism === 'XOAUTH2') {
  options.username = opts.user || 'device';
  options.token = opts.token;
} else {
  throw new Error(`unknown mechanism ${opts.mechanism}`);
}

let finished = false;
function finish(result, conn) {
  if (finished) return;
  finished = true;
  clearTimeout(timer);
  process.stdout.write(JSON.stringify({ ...result, challenges }) + '\n');
  if (conn && !conn.is_closed()) conn.close();
  // Give the close a moment to be written; the socket ends with the process.
  setTimeout(() => process.exit(0), 100);
}

const container = rhea.create_container({ id: 'rhea-token-client' });
const conn = container.connect(options);
const timer = setTimeout(() => finish({ error: { condition: 'timeout', description: 'no result in time' } }, conn), TIMEOUT);
const received = [];
let accepted = 0;

function failed(ctx) {
  const e = ctx.error || (ctx.connection && ctx.connection.error) || {};
  finish({ error: { condition: e.condition || String(e), description: e.description || e.message || '' } }, conn);
}
conn.on('connection_error', failed);
conn.on('disconnected', (ctx) => finish({ error: { condition: 'disconnected', description: String(ctx.error || '') } }));
conn.on('error', (e) => finish({ error: { condition: e.condition || 'error', description: e.description || e.message } }));

const done = () => received.length >= opts.count && accepted >= opts.count;
const receiver = conn.open_receiver(opts.address);
receiver.on('receiver_error', (ctx) => finish({ error: { condition: ctx.receiver.error.condition, description: ctx.receiver.error.description } }, conn));
receiver.on('message', (ctx) => {
  received.push(ctx.message.body);
  if (done()) finish({ received, accepted }, conn);
});
receiver.on('receiver_open', () => {
  const sender = conn.open_sender(opts.address);
  let sent = 0;
  sender.on('sender_error', (ctx) => finish({ error: { condition: ctx.sender.error.condition, description: ctx.sender.error.description } }, conn));
  sender.on('sendable', () => {
    while (sender.sendable() && sent < opts.count) sender.send({ body: `token msg ${sent++}` });
  });
  sender.on('accepted', () => {
    accepted++;
    if (done()) finish({ received, accepted }, conn);
  });
});
