// Browser test of the console's sign-in with an OIDC issuer (issue 16):
// the authorization-code flow with PKCE (S256) against a tiny issuer
// started here (issuer.mjs), the console alone started with
// --oidc-issuer. An editor of tenant-a sees only tenant-a and makes an
// address there; a viewer sees it with no controls to change it and the
// API refuses its changes; the issuer really checks the verifier; an
// issuer's error and an expired sign-in go back to the login screen,
// which axe-core finds clean. Screenshots go to target/browser-screenshots/.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';
import { startConsole, chromiumPath, axe, shot, createAddress } from './system.mjs';
import { startIssuer, challengeOf, newVerifier, newKey, signJwt } from './issuer.mjs';

const STEP = 15000;
const AUDIENCE = 'flotilla-console';
const CLIENT_ID = 'flotilla-web';

let issuer = null;
let konsole = null;
let browser = null;
let base = '';      // the console's origin + '/'
let failed = false;

before(async () => {
  issuer = await startIssuer({ audience: AUDIENCE, clientId: CLIENT_ID });
  konsole = await startConsole([
    '--oidc-issuer', issuer.url,
    '--oidc-audience', AUDIENCE,
    '--oidc-client-id', CLIENT_ID,
  ]);
  base = `http://127.0.0.1:${konsole.consolePort}/`;
  issuer.origin = `http://127.0.0.1:${konsole.consolePort}`;
  // Two tenants, one address in tenant-a: made with the admin token.
  for (const name of ['tenant-a', 'tenant-b']) {
    assert.equal((await rest(konsole.token, 'POST', '/addressspaces', { metadata: { name }, spec: {} })).status, 201, `create ${name}`);
  }
  assert.equal((await rest(konsole.token, 'POST', '/addressspaces/tenant-a/addresses',
    { metadata: { name: 'existing' }, spec: { address: 'existing', type: 'anycast' } })).status, 201);
  browser = await chromium.launch({ executablePath: chromiumPath(), headless: true, args: ['--no-sandbox', '--disable-dev-shm-usage'] });
});

after(async () => {
  if (browser) await browser.close();
  if (konsole) {
    await konsole.stop();
    if (failed) console.log(`flotilla log: ${konsole.logPath}\n${konsole.tail()}`);
    else konsole.remove();
  }
  if (issuer) await issuer.close();
});

/** One REST call to the console with `token`: {status, body}. */
async function rest(token, method, path, body) {
  const r = await fetch(`http://127.0.0.1:${konsole.consolePort}/api/v1${path}`, {
    method,
    headers: { ...(token ? { Authorization: `Bearer ${token}` } : {}), ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await r.text();
  let parsed = text;
  try { parsed = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
  return { status: r.status, body: parsed };
}


/**
 * A fresh tab (its own sessionStorage) that records page errors and the
 * console's answers of 400 or more; `run(page, errors)` does the test.
 */
async function inTab(name, run) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(STEP);
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') errors.push(`console: ${m.text()} (${m.location().url})`); });
  page.on('response', (r) => {
    if (r.status() >= 400 && r.url().startsWith(base)) errors.push(`${r.status()} ${r.request().method()} ${r.url()}`);
  });
  let ok = false;
  try {
    await run(page, errors);
    ok = true;
  } finally {
    if (!ok) {
      failed = true;
      await shot(page, `${name}-failed`).catch(() => {});
      if (errors.length) console.log(`page errors:\n${errors.join('\n')}`);
    }
    await context.close();
  }
}

/** From the login screen through the issuer and back, signed in as `user`. */
async function signIn(page, user) {
  issuer.user = user;
  await page.goto(base);
  const host = new URL(issuer.url).host;
  await page.getByRole('button', { name: `Sign in with ${host}` }).click();
}

test('the console tells how to sign in, without credentials', async () => {
  const auth = await rest(null, 'GET', '/auth');
  assert.equal(auth.status, 200, JSON.stringify(auth.body));
  assert.deepEqual(auth.body, {
    oidc: {
      issuer: issuer.url,
      clientId: CLIENT_ID,
      authorizationEndpoint: `${issuer.url}/authorize`,
      tokenEndpoint: `${issuer.url}/token`,
      scope: 'openid',
    },
  });
  const who = await rest(konsole.token, 'GET', '/whoami');
  assert.equal(who.status, 200, JSON.stringify(who.body));
  assert.equal(who.body.subject, 'admin');
  assert.equal(who.body.admin, true);
});

test('(a) an editor of tenant-a signs in through the code flow, sees only tenant-a and makes an address there', { timeout: 60000 }, async () => {
  await inTab('oidc-editor', async (page, errors) => {
    const before = issuer.exchanges.length;
    await signIn(page, { sub: 'alice', roles: ['editor:tenant-a'] });
    await page.locator('#who').filter({ hasText: 'Signed in as alice (editor of tenant-a)' }).waitFor();
    // Not an administrator: no overview, straight to the one space.
    await page.getByRole('heading', { name: 'Address space tenant-a' }).waitFor();
    assert.equal(new URL(page.url()).search, '', 'the code and state are gone from the address bar');
    assert.deepEqual(await page.locator('#spaces a').allTextContents(), ['tenant-a']);
    const nav = page.getByRole('navigation', { name: 'Pages' });
    assert.equal(await nav.getByRole('link', { name: 'Overview' }).count(), 0, 'no overview link');
    assert.equal(await nav.getByRole('link', { name: 'Mesh map' }).count(), 0, 'no map link');
    assert.equal(await page.locator('#space-form').isVisible(), false, 'no form for a new space');
    assert.equal(await page.getByRole('button', { name: 'Delete this address space' }).count(), 0);

    // What the browser sent: S256, this page as redirect_uri, a verifier
    // of 43 to 128 characters whose hash the challenge was.
    const asked = issuer.authorizations.at(-1);
    assert.equal(asked.response_type, 'code');
    assert.equal(asked.client_id, CLIENT_ID);
    assert.equal(asked.redirect_uri, base);
    assert.equal(asked.scope, 'openid');
    assert.equal(asked.code_challenge_method, 'S256');
    assert.ok(asked.state && asked.state.length >= 16, `state ${asked.state}`);
    const traded = issuer.exchanges.slice(before);
    assert.equal(traded.length, 1, 'one code exchange');
    assert.equal(traded[0].status, 200);
    assert.ok(traded[0].form.code_verifier.length >= 43 && traded[0].form.code_verifier.length <= 128);
    assert.equal(challengeOf(traded[0].form.code_verifier), asked.code_challenge);
    assert.equal(traded[0].form.redirect_uri, base);

    // The token lives in this tab's sessionStorage, never localStorage.
    const kept = await page.evaluate(() => ({ session: sessionStorage.getItem('flotilla-oidc'), local: localStorage.length }));
    assert.equal(kept.local, 0, 'nothing in localStorage');
    const token = JSON.parse(kept.session).accessToken;
    assert.match(token, /^[\w-]+\.[\w-]+\.[\w-]+$/);

    // An address through the form.
    const row = await createAddress(page, 'orders', 'queue');
    await row.getByRole('button', { name: 'Delete address orders' }).waitFor();
    assert.equal(await page.locator('#status').textContent(), '', 'no error shown');
    await axe(page, 'space page of an editor');
    await shot(page, 'oidc-editor');

    // The API agrees: tenant-a is alice's, the rest is not.
    assert.equal((await rest(token, 'GET', '/addressspaces/tenant-a/addresses/orders')).status, 200);
    const listed = await rest(token, 'GET', '/addressspaces');
    assert.deepEqual(listed.body.items.map((s) => s.metadata.name), ['tenant-a'], JSON.stringify(listed.body));
    for (const [method, path, body] of [
      ['GET', '/overview'], ['GET', '/mesh'], ['GET', '/brokers'],
      ['GET', '/addressspaces/tenant-b/addresses'],
      ['POST', '/addressspaces/tenant-b/addresses', { metadata: { name: 'x' }, spec: { address: 'x', type: 'anycast' } }],
      ['DELETE', '/addressspaces/tenant-a'],
      ['POST', '/addressspaces', { metadata: { name: 'tenant-c' }, spec: {} }],
    ]) {
      const r = await rest(token, method, path, body);
      assert.equal(r.status, 403, `${method} ${path} as an editor of tenant-a: ${r.status} ${JSON.stringify(r.body)}`);
    }

    // Sign out: back to the login screen, the token gone.
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.getByRole('heading', { name: 'Log in' }).waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.getItem('flotilla-oidc')), null);
    assert.equal(await page.evaluate(() => document.activeElement?.id), 'oidc-signin', 'focus on the sign-in button');
    assert.deepEqual(errors, [], 'no errors in the page');
  });
});

test('(b) a viewer of tenant-a sees it with no controls to change it; the API refuses its changes', { timeout: 60000 }, async () => {
  await inTab('oidc-viewer', async (page, errors) => {
    await signIn(page, { sub: 'victor', roles: ['viewer:tenant-a'] });
    await page.locator('#who').filter({ hasText: 'Signed in as victor (viewer of tenant-a)' }).waitFor();
    await page.getByRole('heading', { name: 'Address space tenant-a' }).waitFor();
    const row = page.locator('#address-rows tr[data-address="existing"]');
    await row.waitFor();
    assert.equal(await row.getByRole('button').count(), 0, 'no buttons on the address row');
    assert.equal(await page.locator('#address-form').isVisible(), false, 'no form for a new address');
    assert.equal(await page.getByRole('button', { name: /^(Create|Delete|Purge|Close)/ }).count(), 0, 'no create, delete, purge or close controls');
    await page.getByText('You may look at this address space but not change it').waitFor();
    await page.getByRole('tab', { name: 'Users' }).click();
    assert.equal(await page.locator('#user-form').isVisible(), false, 'no form for a new user');
    await page.getByRole('tab', { name: 'Addresses' }).click();
    await axe(page, 'space page of a viewer');
    await shot(page, 'oidc-viewer');

    // The map is the administrators': asked for, it lands on tenant-a
    // without asking the API for it.
    await page.goto(`${base}#/map`);
    await page.waitForURL(/#\/spaces\/tenant-a$/);
    await page.getByRole('heading', { name: 'Address space tenant-a' }).waitFor();
    assert.equal(await page.locator('#map-page').isVisible(), false);
    // The address's own page: no retry or purge either.
    await page.goto(`${base}#/spaces/tenant-a/addresses/existing`);
    await page.getByRole('heading', { name: 'Address existing' }).waitFor();
    assert.equal(await page.getByRole('button', { name: /^(Retry|Purge)/ }).count(), 0);
    assert.deepEqual(errors, [], 'no errors in the page');

    const token = await page.evaluate(() => JSON.parse(sessionStorage.getItem('flotilla-oidc')).accessToken);
    assert.equal((await rest(token, 'GET', '/addressspaces/tenant-a/addresses/existing')).status, 200);
    for (const [method, path, body] of [
      ['POST', '/addressspaces/tenant-a/addresses', { metadata: { name: 'y' }, spec: { address: 'y', type: 'anycast' } }],
      ['DELETE', '/addressspaces/tenant-a/addresses/existing'],
      ['GET', '/addressspaces/tenant-b/addresses'],
    ]) {
      const r = await rest(token, method, path, body);
      assert.equal(r.status, 403, `${method} ${path} as a viewer of tenant-a: ${r.status} ${JSON.stringify(r.body)}`);
    }
    assert.equal((await rest(konsole.token, 'GET', '/addressspaces/tenant-a/addresses/existing')).status, 200, 'still there');
  });
});

test('(c) the issuer refuses a code traded with the wrong verifier (PKCE is checked)', async () => {
  // A code for a challenge, asked for as the browser would.
  const code = async (verifier) => {
    issuer.user = { sub: 'mallory', roles: ['admin'] };
    const u = new URL(`${issuer.url}/authorize`);
    const q = {
      response_type: 'code', client_id: CLIENT_ID, redirect_uri: base, scope: 'openid', state: 's1',
      code_challenge: challengeOf(verifier), code_challenge_method: 'S256',
    };
    for (const [k, v] of Object.entries(q)) u.searchParams.set(k, v);
    const r = await fetch(u, { redirect: 'manual' });
    assert.equal(r.status, 302);
    const back = new URL(r.headers.get('location'));
    assert.equal(back.origin + back.pathname, base);
    assert.equal(back.searchParams.get('state'), 's1');
    return back.searchParams.get('code');
  };
  const trade = async (c, verifier) => {
    const form = { grant_type: 'authorization_code', code: c, redirect_uri: base, client_id: CLIENT_ID };
    if (verifier !== undefined) form.code_verifier = verifier;
    const r = await fetch(`${issuer.url}/token`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams(form),
    });
    return { status: r.status, body: await r.json() };
  };
  const right = newVerifier();
  const wrong = await trade(await code(right), newVerifier());
  assert.equal(wrong.status, 400);
  assert.equal(wrong.body.error, 'invalid_grant');
  assert.equal(wrong.body.access_token, undefined);
  const none = await trade(await code(right));
  assert.equal(none.status, 400, 'no verifier at all');
  // The same request with the right verifier gets a token: the verifier,
  // not something else, made the difference.
  const good = await trade(await code(right), right);
  assert.equal(good.status, 200, JSON.stringify(good.body));
  assert.equal(good.body.token_type, 'Bearer');
  // And the console takes that token (mallory is an admin).
  const who = await rest(good.body.access_token, 'GET', '/whoami');
  assert.equal(who.status, 200, JSON.stringify(who.body));
  assert.deepEqual({ subject: who.body.subject, admin: who.body.admin }, { subject: 'mallory', admin: true });
  // A code is for one try.
  const again = await trade(await code(right), right);
  assert.equal(again.status, 200);
});

test('(d) the login screen, with the sign-in offered, passes axe-core', async () => {
  await inTab('oidc-login', async (page, errors) => {
    await page.goto(base);
    const host = new URL(issuer.url).host;
    const signInButton = page.getByRole('button', { name: `Sign in with ${host}` });
    await signInButton.waitFor();
    // Both ways in: the issuer and the admin token.
    await page.getByLabel('Admin token').waitFor();
    await page.getByRole('button', { name: 'Log in' }).waitFor();
    assert.equal(await page.evaluate(() => document.activeElement?.id), 'oidc-signin', 'focus on the sign-in button');
    await axe(page, 'login screen');
    await shot(page, 'oidc-login');
    assert.deepEqual(errors, [], 'no errors in the page');
  });
});

test('an error from the issuer is shown on the login screen', { timeout: 60000 }, async () => {
  await inTab('oidc-denied', async (page, errors) => {
    await signIn(page, { deny: 'the user said no' });
    const error = page.locator('#login-error');
    await error.filter({ hasText: 'access_denied' }).waitFor();
    assert.match(await error.textContent(), /failed: access_denied \(the user said no\)/);
    assert.equal(new URL(page.url()).search, '', 'the error is gone from the address bar');
    assert.equal(await page.locator('#login').isVisible(), true);
    await axe(page, 'login screen with an error');
    assert.deepEqual(errors, [], 'no errors in the page');
  });
});

test('an expired sign-in, or a token the console refuses, goes back to the login screen', { timeout: 60000 }, async () => {
  await inTab('oidc-expired', async (page, errors) => {
    await signIn(page, { sub: 'erin', roles: ['viewer:tenant-a'], expiresIn: 3 });
    await page.getByRole('heading', { name: 'Address space tenant-a' }).waitFor();
    await page.locator('#login-error').filter({ hasText: 'Your sign-in expired' }).waitFor({ timeout: 10000 });
    assert.equal(await page.locator('#app').isVisible(), false, 'the space page is gone');
    assert.equal(await page.evaluate(() => sessionStorage.getItem('flotilla-oidc')), null);
    assert.deepEqual(errors, [], 'no errors in the page');

    // A token signed with a key the issuer never published: 401, and the
    // console says so on the login screen.
    const forged = signJwt(newKey(), {
      iss: issuer.url, aud: AUDIENCE, sub: 'forger', roles: ['admin'],
      iat: Math.floor(Date.now() / 1000), exp: Math.floor(Date.now() / 1000) + 300,
    });
    assert.equal((await rest(forged, 'GET', '/whoami')).status, 401);
    await page.evaluate((t) => sessionStorage.setItem('flotilla-oidc', JSON.stringify({ accessToken: t, expiresAt: Date.now() + 300000 })), forged);
    await page.reload();
    await page.locator('#login-error').filter({ hasText: 'does not accept' }).waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.getItem('flotilla-oidc')), null);
    // A token the issuer signed for another audience: 401 too.
    assert.equal((await rest(issuer.token({ sub: 'alice', roles: ['admin'] }, { aud: 'someone-else' }), 'GET', '/whoami')).status, 401);
  });
});

test('the admin token still logs in beside the sign-in', { timeout: 60000 }, async () => {
  await inTab('oidc-admin-token', async (page, errors) => {
    await page.goto(base);
    await page.getByLabel('Admin token').fill(konsole.token);
    await page.getByRole('button', { name: 'Log in' }).click();
    await page.getByRole('heading', { name: 'Overview', exact: true }).waitFor();
    assert.equal(await page.locator('#who').textContent(), 'admin');
    await page.getByRole('button', { name: 'Log out' }).waitFor();
    await page.getByRole('navigation', { name: 'Pages' }).getByRole('link', { name: 'Address spaces' }).click();
    await page.getByRole('heading', { name: 'Address space default' }).waitFor();
    const spaces = await page.locator('#spaces a').allTextContents();
    assert.deepEqual(spaces, ['default', 'tenant-a', 'tenant-b']);
    assert.deepEqual(errors, [], 'no errors in the page');
  });
});
