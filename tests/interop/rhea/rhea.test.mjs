// Interop with rhea (a JavaScript AMQP 1.0 client nobody here wrote).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import rhea from 'rhea';
import { startRouter } from './router.mjs';

const TIMEOUT = 10000;

function within(ms, what, fn) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), ms);
    fn((v) => { clearTimeout(timer); resolve(v); }, (e) => { clearTimeout(timer); reject(e); });
  });
}

test('send and receive with outcomes', async () => {
  const router = await startRouter();
  try {
    const container = rhea.create_container();
    const got = [];
    let accepted = 0;
    await within(TIMEOUT, '10 messages and their outcomes', (done) => {
      const conn = container.connect({ host: '127.0.0.1', port: router.port, reconnect: false });
      const receiver = conn.open_receiver('rhea-q');
      receiver.on('message', (ctx) => { got.push(ctx.message.body); });
      receiver.on('receiver_open', () => {
        const sender = conn.open_sender('rhea-q');
        let sent = 0;
      let sender_ref = null;
      let transmitted = -1;
        sender.on('sendable', () => {
          while (sender.sendable() && sent < 10) sender.send({ body: `m${sent++}` });
        });
        sender.on('accepted', () => { if (++accepted === 10) { conn.close(); done(); } });
      });
    });
    assert.deepEqual(got, Array.from({ length: 10 }, (_, i) => `m${i}`));
    assert.equal(accepted, 10);
  } finally {
    await router.stop();
  }
});

test('request/reply through a dynamic reply address and anonymous relay', async () => {
  const router = await startRouter();
  try {
    const container = rhea.create_container();
    const replies = await within(TIMEOUT, 'replies', (done) => {
      // The server answers on each request's reply_to through one anonymous sender.
      const server = container.connect({ host: '127.0.0.1', port: router.port, reconnect: false });
      const relay = server.open_sender({ target: {} });
      const requests = server.open_receiver('rhea-service');
      requests.on('message', (ctx) => {
        relay.send({ to: ctx.message.reply_to, body: String(ctx.message.body).toUpperCase() });
      });
      requests.on('receiver_open', () => {
        const client = container.connect({ host: '127.0.0.1', port: router.port, reconnect: false });
        const out = [];
        const rx = client.open_receiver({ source: { dynamic: true } });
        rx.on('receiver_open', (ctx) => {
          const replyTo = ctx.receiver.source.address;
          assert.ok(replyTo.length > 0);
          const tx = client.open_sender('rhea-service');
          tx.once('sendable', () => {
            for (const b of ['one', 'two', 'three']) tx.send({ body: b, reply_to: replyTo });
          });
        });
        rx.on('message', (ctx) => {
          out.push(ctx.message.body);
          if (out.length === 3) { client.close(); server.close(); done(out); }
        });
      });
    });
    assert.deepEqual(replies, ['ONE', 'TWO', 'THREE']);
  } finally {
    await router.stop();
  }
});

test('a sender gets no credit until a receiver attaches', async () => {
  const router = await startRouter();
  try {
    const container = rhea.create_container();
    await within(TIMEOUT, 'credit after a receiver attached', (done, fail) => {
      const conn = container.connect({ host: '127.0.0.1', port: router.port, reconnect: false });
      const sender = conn.open_sender('rhea-lonely');
      sender.on('sender_open', () => {
        if (sender.credit !== 0) return fail(new Error(`credit ${sender.credit} with no receiver`));
        sender.once('sendable', () => { conn.close(); done(); });
        conn.open_receiver('rhea-lonely');
      });
    });
  } finally {
    await router.stop();
  }
});

test('a router asked to stop settles what is in flight, then closes rhea with forced, or a redirect when asked for', async () => {
  for (const follows of [false, true]) {
    const router = await startRouter('--redirect', '127.0.0.1:5999');
    try {
      const container = rhea.create_container();
      const got = new Set();
      const outcomes = { accepted: new Set(), released: 0 };
      let sent = 0;
      let sender_ref = null;
      let transmitted = -1;
      const closed = await within(TIMEOUT, 'the router closes the connection', (done) => {
        const opts = { host: '127.0.0.1', port: router.port, reconnect: false };
        if (follows) opts.desired_capabilities = ['flotilla:redirect'];
        const conn = container.connect(opts);
        const receiver = conn.open_receiver('rhea-drain');
        receiver.on('message', (ctx) => { got.add(ctx.message.body); });
        receiver.on('receiver_open', () => {
          const sender = conn.open_sender('rhea-drain');
          sender_ref = sender;
          sender.on('sendable', () => {
            while (sender.sendable()) {
              const d = sender.send({ body: sent });
              d.sent_body = sent++;
            }
          });
          sender.on('accepted', (ctx) => {
            outcomes.accepted.add(ctx.delivery.sent_body);
            if (outcomes.accepted.size === 500) router.term();
          });
          sender.on('released', () => { outcomes.released++; });
        });
        // rhea queues what send() is given and counts a delivery when it
        // goes on the wire: every one that went must have its outcome.
        conn.on('connection_error', (ctx) => { transmitted = sender_ref.delivery_count; done(ctx.connection.error); });
        conn.on('disconnected', () => done(null));
      });
      assert.ok(closed, 'closed with an error condition');
      if (follows) {
        assert.equal(closed.condition, 'amqp:connection:redirect');
        assert.equal(Number(closed.info.port), 5999);
      } else {
        assert.equal(closed.condition, 'amqp:connection:forced');
      }
      assert.ok(outcomes.accepted.size >= 500);
      assert.ok(transmitted >= 500 && transmitted <= sent);
      assert.equal(outcomes.accepted.size + outcomes.released, transmitted, 'every delivery on the wire has its outcome');
      for (const m of outcomes.accepted) assert.ok(got.has(m), `accepted ${m} never arrived`);
    } finally {
      await router.stop();
    }
  }
});
