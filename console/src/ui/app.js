// Flotilla console: plain JavaScript over the REST API (/api/v1). No build
// step, no CDN; charts and the map are SVG drawn here. Who calls the API:
// the admin token (break-glass), or, when the console trusts an OIDC
// issuer (GET /api/v1/auth), an access token got with the authorization-code
// flow with PKCE (RFC 7636, S256). Either stays in this tab's
// sessionStorage only. What a signed-in user may see and change comes from
// GET /api/v1/whoami; pages the user may not use are not offered. Pages are
// routes in the hash:
//   #/                                  overview (the landing page)
//   #/map                               the mesh
//   #/spaces/S                          an address space
//   #/spaces/S/addresses/NAME           an address
//   #/spaces/S/connections/ROUTER/ID    a connection
"use strict";

const PAGE = 50;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
// sessionStorage keys: the admin token; an OIDC access token with its
// expiry ({accessToken, expiresAt}); a sign-in under way ({verifier, state,
// hash}).
const ADMIN_KEY = "flotilla-token";
const OIDC_KEY = "flotilla-oidc";
const PENDING_KEY = "flotilla-oidc-pending";
let token = sessionStorage.getItem(ADMIN_KEY) || "";
let kind = "admin";      // what `token` is: "admin" or "oidc"
let expiresAt = null;    // when an OIDC token expires (ms since the epoch)
let expiryTimer = null;
let me = null;           // GET /whoami: {subject, admin, editor: [..], viewer: [..]}
let oidc = null;         // GET /auth's oidc: {issuer, clientId, authorizationEndpoint, tokenEndpoint, scope}
let space = null;
let pages = [null];      // continue tokens of the pages seen
let page = 0;
let sort = { by: "name", desc: false };
let metrics = new Map();  // address -> live numbers
let timer = null;
let route = { page: "overview" };
let picked = null;       // the map's selected node

async function api(method, path, body) {
  if (kind === "oidc" && expiresAt && Date.now() >= expiresAt) {
    const e = new Error("the sign-in expired");
    e.status = 401;
    throw e;
  }
  const r = await fetch("/api/v1" + path, {
    method,
    headers: Object.assign({ Authorization: "Bearer " + token },
      body ? { "Content-Type": "application/json" } : {}),
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await r.text();
  let data = {};
  try { data = text ? JSON.parse(text) : {}; } catch { data = { message: text }; }
  if (!r.ok) {
    const e = new Error(data.message || r.statusText);
    e.status = r.status;
    throw e;
  }
  return data;
}

const enc = (s) => encodeURIComponent(s);
const fmt = (n) => (n === undefined || n === null ? "0" : Number(n).toLocaleString("en-US", { maximumFractionDigits: 1 }));

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function cell(row, text, cls) {
  const td = el("td", cls ? { class: cls } : {}, text === undefined || text === null ? "" : text);
  row.appendChild(td);
  return td;
}

function linkCell(row, text, href, cls) {
  const td = el("td", cls ? { class: cls } : {});
  td.appendChild(el("a", { href }, text));
  row.appendChild(td);
  return td;
}

function button(row, label, onClick, danger) {
  const td = el("td");
  const b = el("button", danger ? { class: "danger" } : {}, label);
  b.addEventListener("click", onClick);
  td.appendChild(b);
  row.appendChild(td);
  return b;
}

function status(msg) {
  const target = route.page === "space" ? $("status") : $("page-status");
  $("status").textContent = "";
  $("page-status").textContent = "";
  target.textContent = msg || "";
}

async function guarded(f) {
  try { status(""); await f(); } catch (e) {
    if (e.status === 401) return logout(refusedMessage());
    status(e.message);
  }
}

function refusedMessage() {
  return kind === "oidc" ? "Your sign-in expired or is no longer accepted: sign in again." : "The token was refused.";
}

// What the user may do: everything (admin), or change (editor) or look at
// (viewer) the spaces their roles name.
const isAdmin = () => !!(me && me.admin);
const canEdit = (s) => isAdmin() || !!(me && (me.editor || []).includes(s));
function mySpaces() {
  return me ? [...new Set([...(me.editor || []), ...(me.viewer || [])])] : [];
}

// ---- logging in ------------------------------------------------------------

// Logs in with `t`, the admin token (how = "admin") or an OIDC access
// token (how = "oidc", valid until `until`), if the console takes it.
async function login(t, how = "admin", until = null) {
  token = t;
  kind = how;
  expiresAt = how === "oidc" ? until : null;
  try {
    me = await api("GET", "/whoami");
  } catch (e) {
    token = "";
    me = null;
    if (how === "oidc") {
      sessionStorage.removeItem(OIDC_KEY);
      $("login-error").textContent = e.status === 401
        ? "The console does not accept the token from " + issuerHost() + " (" + e.message + "). Sign in again, or ask an administrator."
        : e.message;
    } else {
      $("login-error").textContent = e.status === 401 ? "That is not the admin token." : e.message;
    }
    kind = "admin";
    expiresAt = null;
    focusLogin();
    return;
  }
  // One way in per tab: the other's token goes.
  if (how === "admin") { sessionStorage.setItem(ADMIN_KEY, token); sessionStorage.removeItem(OIDC_KEY); } else sessionStorage.removeItem(ADMIN_KEY);
  $("login").hidden = true;
  $("login-status").textContent = "";
  $("login-error").textContent = "";
  $("logout").hidden = false;
  $("logout").textContent = how === "oidc" ? "Sign out" : "Log out";
  $("top-nav").hidden = false;
  $("who").textContent = how === "oidc" ? "Signed in as " + me.subject + roleSummary() : "admin";
  applyRoles();
  if (expiryTimer) clearTimeout(expiryTimer);
  expiryTimer = null;
  // setTimeout takes at most 2^31-1 ms; api() checks the expiry anyway.
  if (expiresAt && expiresAt - Date.now() < 2 ** 31 - 1) {
    expiryTimer = setTimeout(() => logout("Your sign-in expired: sign in again."), Math.max(0, expiresAt - Date.now()));
  }
  await guarded(show);
  if (!timer) timer = setInterval(() => refreshLive(), 1000);
}

function roleSummary() {
  if (me.admin) return " (admin)";
  const parts = [];
  if ((me.editor || []).length) parts.push("editor of " + me.editor.join(", "));
  if ((me.viewer || []).length) parts.push("viewer of " + me.viewer.join(", "));
  return " (" + (parts.join("; ") || "no roles here") + ")";
}

// Offers only what the user may use: the overview and the map are the
// administrators'; so is making an address space.
function applyRoles() {
  for (const a of $("top-nav").querySelectorAll("a")) {
    const href = a.getAttribute("href");
    a.hidden = (href === "#/" || href === "#/map") && !isAdmin();
  }
  $("space-form").hidden = !isAdmin();
}

function logout(msg) {
  const was = kind;
  sessionStorage.removeItem(ADMIN_KEY);
  sessionStorage.removeItem(OIDC_KEY);
  token = "";
  kind = "admin";
  me = null;
  expiresAt = null;
  if (expiryTimer) { clearTimeout(expiryTimer); expiryTimer = null; }
  for (const p of document.querySelectorAll(".page")) p.hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("top-nav").hidden = true;
  $("who").textContent = "";
  $("page-status").textContent = "";
  $("login-error").textContent = msg || "";
  $("login-status").textContent = !msg && was === "oidc"
    ? "You are signed out of this console (your session at " + issuerHost() + " may still be open)." : "";
  if (timer) { clearInterval(timer); timer = null; }
  focusLogin();
}

function focusLogin() {
  if (oidc) $("oidc-signin").focus(); else $("token").focus();
}

// ---- signing in with the OIDC issuer (authorization code + PKCE) -------------

function issuerHost() {
  try { return new URL(oidc.issuer).host; } catch { return oidc && oidc.issuer ? oidc.issuer : "the identity provider"; }
}

// Where the issuer sends the browser back: this page, without query or hash.
const redirectUri = () => location.origin + location.pathname;

function base64url(bytes) {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

// `n` random bytes as base64url: 48 give a 64-character verifier
// (RFC 7636 §4.1 asks for 43 to 128 of [A-Za-z0-9-._~]).
function randomText(n) {
  const b = new Uint8Array(n);
  crypto.getRandomValues(b);
  return base64url(b);
}

async function signIn() {
  $("login-error").textContent = "";
  if (!oidc) return;
  // crypto.subtle exists only in secure contexts (HTTPS, or localhost).
  if (!window.crypto || !crypto.subtle) {
    $("login-error").textContent = "Signing in needs this console on HTTPS (or localhost): the browser computes the PKCE challenge only there. Use the admin token, or reach the console over HTTPS.";
    return;
  }
  const verifier = randomText(48);
  const state = randomText(24);
  // RFC 7636 §4.2: S256, BASE64URL(SHA256(ASCII(code_verifier))).
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
  const challenge = base64url(new Uint8Array(digest));
  sessionStorage.setItem(PENDING_KEY, JSON.stringify({ verifier, state, hash: location.hash }));
  const u = new URL(oidc.authorizationEndpoint);
  const q = {
    response_type: "code",
    client_id: oidc.clientId,
    redirect_uri: redirectUri(),
    scope: oidc.scope || "openid",
    state,
    code_challenge: challenge,
    code_challenge_method: "S256",
  };
  for (const [k, v] of Object.entries(q)) u.searchParams.set(k, v);
  $("login-status").textContent = "Going to " + issuerHost() + "…";
  location.assign(u.toString());
}

// Back from the issuer with ?code=&state= (or ?error=): checks the state,
// trades the code and the verifier for an access token at the token
// endpoint, and logs in with it.
async function finishSignIn(q) {
  let pending = null;
  try { pending = JSON.parse(sessionStorage.getItem(PENDING_KEY) || "null"); } catch { pending = null; }
  sessionStorage.removeItem(PENDING_KEY);
  // The code is for one use: out of the address bar and the history.
  history.replaceState(null, "", location.pathname + ((pending && pending.hash) || ""));
  const fail = (msg) => { $("login-status").textContent = ""; $("login-error").textContent = msg; focusLogin(); };
  if (q.get("error")) {
    const why = q.get("error_description");
    return fail("Signing in at " + (oidc ? issuerHost() : "the identity provider") + " failed: " + q.get("error") + (why ? " (" + why + ")" : "") + ".");
  }
  if (!oidc) return fail("This console signs in with no identity provider; use the admin token.");
  if (!pending || !q.get("state") || q.get("state") !== pending.state) {
    return fail("That sign-in answer is not for a sign-in started in this tab (its state does not match). Sign in again.");
  }
  $("login-status").textContent = "Signing in…";
  let r, data = {};
  try {
    r = await fetch(oidc.tokenEndpoint, {
      method: "POST",
      headers: { "Content-Type": "application/x-www-form-urlencoded", Accept: "application/json" },
      body: new URLSearchParams({
        grant_type: "authorization_code",
        code: q.get("code"),
        redirect_uri: redirectUri(),
        client_id: oidc.clientId,
        code_verifier: pending.verifier,
      }),
    });
    data = await r.json().catch(() => ({}));
  } catch (e) {
    return fail("Could not reach " + issuerHost() + " to finish signing in (" + e.message + ").");
  }
  if (!r.ok || !data.access_token) {
    const why = data.error ? data.error + (data.error_description ? " (" + data.error_description + ")" : "") : "HTTP " + r.status;
    return fail(issuerHost() + " did not give a token: " + why + ". Sign in again.");
  }
  if (data.token_type && data.token_type.toLowerCase() !== "bearer") {
    return fail(issuerHost() + " gave a " + data.token_type + " token; the console takes Bearer tokens only.");
  }
  const until = expiryOf(data);
  sessionStorage.setItem(OIDC_KEY, JSON.stringify({ accessToken: data.access_token, expiresAt: until }));
  await login(data.access_token, "oidc", until);
}

// When a token answer expires: expires_in (relative, so the browser's clock
// need not agree with the issuer's), else the JWT's exp, else never known.
function expiryOf(data) {
  const secs = Number(data.expires_in);
  if (secs > 0) return Date.now() + secs * 1000;
  try {
    const claims = JSON.parse(atob(data.access_token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    if (typeof claims.exp === "number") return claims.exp * 1000;
  } catch { /* not a JWT we can read: the console's 401 tells */ }
  return null;
}

// On load: the console's sign-in settings, then an answer from the issuer,
// a token this tab kept, or the login screen.
async function start() {
  try {
    const r = await fetch("/api/v1/auth");
    if (r.ok) oidc = (await r.json()).oidc || null;
    else {
      // The console trusts an issuer it cannot reach now (502).
      const e = await r.json().catch(() => ({}));
      $("login-status").textContent = "Signing in through the identity provider is not possible now" +
        (e.message ? " (" + e.message + ")" : "") + "; the admin token still works.";
    }
  } catch { oidc = null; }
  if (oidc) {
    $("oidc-signin").textContent = "Sign in with " + issuerHost();
    $("oidc-login").hidden = false;
    $("token-h").hidden = false;
  }
  const q = new URLSearchParams(location.search);
  if (q.has("code") || q.has("error")) return finishSignIn(q);
  let saved = null;
  try { saved = JSON.parse(sessionStorage.getItem(OIDC_KEY) || "null"); } catch { saved = null; }
  if (saved && saved.accessToken) {
    if (!saved.expiresAt || saved.expiresAt > Date.now()) return login(saved.accessToken, "oidc", saved.expiresAt);
    sessionStorage.removeItem(OIDC_KEY);
    $("login-error").textContent = "Your sign-in expired: sign in again.";
  }
  if (token) return login(token, "admin");
  focusLogin();
}

// ---- pages -----------------------------------------------------------------

function parseRoute() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "map") return { page: "map" };
  if (parts[0] === "spaces" && parts[1]) {
    if (parts[2] === "addresses" && parts[3]) return { page: "address", space: parts[1], name: parts[3], messages: parts[4] === "messages" };
    if (parts[2] === "connections" && parts[3] && parts[4]) return { page: "connection", space: parts[1], router: parts[3], id: parts[4] };
    return { page: "space", space: parts[1] };
  }
  return { page: "overview" };
}

const PAGES = { overview: "overview-page", map: "map-page", space: "app", address: "address-page", connection: "connection-page" };

async function show() {
  route = parseRoute();
  // The overview and the map are the administrators': others land on
  // their own address spaces.
  if (!isAdmin() && (route.page === "overview" || route.page === "map")) route = { page: "space", space: null };
  for (const [k, id] of Object.entries(PAGES)) $(id).hidden = k !== route.page;
  for (const a of $("top-nav").querySelectorAll("a")) {
    const here = (a.getAttribute("href") === "#/" && route.page === "overview") ||
      (a.getAttribute("href") === "#/map" && route.page === "map") ||
      (a.getAttribute("href").startsWith("#/spaces") && ["space", "address", "connection"].includes(route.page));
    if (here) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  if (route.page === "overview") await refreshOverview();
  else if (route.page === "map") await refreshMap();
  else if (route.page === "space") {
    await loadSpaces(route.space);
  } else if (route.page === "address") await loadAddressPage();
  else if (route.page === "connection") await loadConnectionPage();
  const h = document.querySelector("#" + PAGES[route.page] + " h2");
  if (h && document.activeElement && document.activeElement.tagName === "A") { h.setAttribute("tabindex", "-1"); h.focus(); }
}

async function refreshLive() {
  if (!token || !me) return;
  try {
    if (route.page === "overview") await refreshOverview();
    else if (route.page === "map") await refreshMap();
    else if (route.page === "space" && space) {
      await refreshMetrics();
      if (!$("connections").hidden) await loadConnections();
    } else if (route.page === "address") await refreshAddressLive();
    else if (route.page === "connection") await refreshConnectionLive();
  } catch (e) {
    if (e.status === 401) logout(refusedMessage());
  }
}

// ---- charts (SVG) ------------------------------------------------------------

const COLORS = ["#1f5fa6", "#a14400", "#2e6b30"];

// Draws `series` ([{name, points: [[t, v], ...]}]) as lines over time in
// `host`; its accessible name says the latest value of each.
function chart(host, series, unit) {
  const w = Math.max(300, host.clientWidth || 600);
  const h = 180;
  const pad = { l: 56, r: 12, t: 10, b: 26 };
  const all = series.flatMap((s) => s.points);
  // Always the last 15 minutes: a line grows in from the right.
  const t1 = Math.max(Math.floor(Date.now() / 1000), ...all.map((p) => p[0]));
  const t0 = t1 - 900;
  const step = niceStep(Math.max(1, ...all.map((p) => p[1])) / 4);
  const top = step * Math.max(1, Math.ceil(Math.max(1, ...all.map((p) => p[1])) / step));
  const x = (t) => pad.l + ((t - t0) / (t1 - t0)) * (w - pad.l - pad.r);
  const y = (v) => h - pad.b - (v / top) * (h - pad.t - pad.b);
  let svg = `<svg xmlns="${SVG}" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" role="img" aria-label="${esc(
    series.map((s) => s.name + ": " + fmt(s.points.length ? s.points[s.points.length - 1][1] : 0) + " " + unit).join("; "))}">`;
  for (let v = 0; v <= top + step / 2; v += step) {
    svg += `<line x1="${pad.l}" x2="${w - pad.r}" y1="${y(v)}" y2="${y(v)}" class="grid"/>`;
    svg += `<text x="${pad.l - 6}" y="${y(v) + 4}" text-anchor="end" class="axis">${esc(short(v))}</text>`;
  }
  for (const m of [15, 10, 5, 0]) {
    const t = t1 - m * 60;
    if (t < t0) continue;
    svg += `<text x="${x(t)}" y="${h - 6}" text-anchor="middle" class="axis">${m ? "-" + m + " min" : "now"}</text>`;
  }
  series.forEach((s, i) => {
    if (s.points.length) {
      const d = s.points.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" ");
      svg += `<polyline fill="none" stroke="${COLORS[i % COLORS.length]}" stroke-width="2" points="${d}"/>`;
    }
    svg += `<rect x="${pad.l + 8 + i * 130}" y="${pad.t + 2}" width="10" height="10" fill="${COLORS[i % COLORS.length]}"/>`;
    svg += `<text x="${pad.l + 22 + i * 130}" y="${pad.t + 11}" class="legend">${esc(s.name)}</text>`;
  });
  host.innerHTML = svg + "</svg>";
}

// The smallest of 1, 2, 2.5, 5 × 10^k at least `v` (a tick step).
function niceStep(v) {
  const p = Math.pow(10, Math.floor(Math.log10(Math.max(v, 1e-9))));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function short(v) {
  if (v >= 1e6) return (v / 1e6).toFixed(v % 1e6 ? 1 : 0) + "M";
  if (v >= 1e3) return (v / 1e3).toFixed(v % 1e3 ? 1 : 0) + "k";
  return String(Math.round(v * 10) / 10);
}

function esc(s) {
  return String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

// ---- the overview ------------------------------------------------------------

async function refreshOverview() {
  const o = await api("GET", "/overview");
  const t = o.totals;
  const cards = [["Address spaces", t.addressSpaces], ["Addresses", t.addresses], ["Connections", t.connections],
    ["Senders", t.senders], ["Receivers", t.receivers]];
  const ul = $("totals");
  if (ul.children.length !== cards.length) {
    ul.replaceChildren(...cards.map(([k]) => {
      const li = el("li");
      li.appendChild(el("span", { class: "value" }));
      li.appendChild(el("span", { class: "label" }, k));
      return li;
    }));
  }
  cards.forEach(([, v], i) => { ul.children[i].firstChild.textContent = fmt(v); });
  const secs = o.seconds || [];
  chart($("rates-chart"), [
    { name: "in", points: secs.map((s) => [s.t, s.in]) },
    { name: "out", points: secs.map((s) => [s.t, s.out]) },
  ], "messages/s");
  chart($("stored-chart"), [{ name: "stored", points: secs.map((s) => [s.t, s.stored]) }], "messages");
  const tb = $("busiest-rows");
  tb.replaceChildren();
  for (const b of o.busiest) {
    const tr = el("tr");
    linkCell(tr, b.address, "#/spaces/" + enc(b.space) + "/addresses/" + enc(b.address));
    linkCell(tr, b.space, "#/spaces/" + enc(b.space));
    cell(tr, fmt(b.in), "num in");
    cell(tr, fmt(b.out), "num out");
    cell(tr, fmt(b.stored), "num");
    tb.appendChild(tr);
  }
  if (!o.busiest.length) {
    const tr = el("tr");
    tr.appendChild(el("td", { colspan: "5" }, "Nothing moves right now."));
    tb.appendChild(tr);
  }
  const down = o.components.filter((c) => c.state !== "up");
  $("down-list").replaceChildren(...(down.length ? down.map((c) =>
    el("li", {}, c.kind + " " + c.name + ": " + (c.state === "down" ? "down (no report for " + Math.round(c.lastReportMs / 1000) + " s)" : "not ready"))) :
    [el("li", {}, "All " + o.components.length + " components report.")]));
}

// ---- the map -----------------------------------------------------------------

const KIND_NAMES = { router: "Router", broker: "Broker", gateway: "MQTT gateway", lwt: "Last-will service" };

async function refreshMap() {
  const m = await api("GET", "/mesh");
  drawMap(m);
  if (picked) await showNode(picked, false);
}

function drawMap(m) {
  const host = $("map");
  const w = Math.max(500, host.clientWidth || 800);
  const h = 560;
  const cx = w / 2, cy = h / 2 - 20;
  const routers = m.nodes.filter((n) => n.kind === "router");
  const others = m.nodes.filter((n) => n.kind !== "router");
  const pos = new Map();
  // Room for a component (125 px out) and its caption around every router.
  const r = routers.length > 1 ? Math.max(60, Math.min(cx - 180, cy - 180, 80 + 25 * routers.length)) : 0;
  routers.forEach((n, i) => {
    const a = (2 * Math.PI * i) / Math.max(1, routers.length) - Math.PI / 2;
    pos.set(n.id, { x: cx + r * Math.cos(a), y: cy + r * Math.sin(a), a });
  });
  // A component sits outside the router it is on; one on none, below.
  const around = new Map();
  let loose = 0;
  for (const n of others) {
    const e = m.edges.find((e) => (e.to === n.id && pos.has(e.from)) || (e.from === n.id && pos.has(e.to)));
    const on = e ? (pos.has(e.from) ? e.from : e.to) : null;
    if (on) {
      const k = around.get(on) || 0;
      around.set(on, k + 1);
      const p = pos.get(on);
      const a = (routers.length > 1 ? p.a : Math.PI / 2) + (k % 2 ? 1 : -1) * Math.ceil(k / 2) * 0.75;
      const d = 125;
      pos.set(n.id, { x: p.x + d * Math.cos(a), y: p.y + d * Math.sin(a) });
    } else {
      pos.set(n.id, { x: 60 + loose * 140, y: h - 80 });
      loose += 1;
    }
  }
  let svg = `<svg xmlns="${SVG}" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" role="group" aria-label="Mesh map: ${m.nodes.length} components">`;
  for (const e of m.edges) {
    const a = pos.get(e.from), b = pos.get(e.to);
    if (a && b) svg += `<line x1="${a.x}" y1="${a.y}" x2="${b.x}" y2="${b.y}" class="edge"/>`;
  }
  for (const n of m.nodes) {
    const p = pos.get(n.id);
    const load = n.kind === "router" ? fmt(n.connections) + " conn, " + fmt(n.rate) + " msg/s"
      : n.kind === "broker" ? fmt(n.stored) + " stored, " + fmt(n.rate) + " msg/s"
        : n.kind === "gateway" ? fmt(n.connections) + " sessions" : fmt(n.wills) + " wills";
    const kind = n.kind === "router" && n.edge ? "Edge router" : KIND_NAMES[n.kind] || n.kind;
    // The name holds the text shown (name, then load), then the state.
    const label = kind + " " + n.name + " " + load + " (" + n.state + ")";
    const shape = n.kind === "router"
      ? `<circle r="22" class="node ${n.state}"/>`
      : `<rect x="-20" y="-16" width="40" height="32" rx="4" class="node ${n.state}"/>`;
    svg += `<g transform="translate(${p.x.toFixed(1)},${p.y.toFixed(1)})" class="map-node${picked === n.id ? " picked" : ""}" tabindex="0" role="button" data-id="${esc(n.id)}" data-state="${esc(n.state)}" aria-label="${esc(label)}">` +
      shape + `<text y="4" text-anchor="middle" class="node-kind" aria-hidden="true">${esc(n.kind === "router" ? (n.edge ? "E" : "R") : n.kind === "broker" ? "B" : n.kind === "gateway" ? "G" : "L")}</text></g>` +
      // The captions are beside the button (its name says it all).
      `<g transform="translate(${p.x.toFixed(1)},${p.y.toFixed(1)})" aria-hidden="true">` +
      `<text y="38" text-anchor="middle" class="node-name">${esc(n.name)}</text>` +
      `<text y="52" text-anchor="middle" class="node-load">${esc(load)}</text></g>`;
  }
  host.innerHTML = svg + "</svg>";
  for (const g of host.querySelectorAll("g.map-node")) {
    const open = () => guarded(() => showNode(g.dataset.id, true));
    g.addEventListener("click", open);
    g.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } });
  }
}

async function showNode(id, focus) {
  picked = id;
  const c = await api("GET", "/components/" + id.split("/").map(enc).join("/"));
  $("node").hidden = false;
  $("node-h").textContent = (KIND_NAMES[c.kind] || c.kind) + " " + c.name + " (" + c.state + ")";
  const facts = $("node-facts");
  facts.replaceChildren();
  for (const [k, v] of Object.entries(c.facts || {})) {
    facts.appendChild(el("dt", {}, k));
    facts.appendChild(el("dd", {}, v));
  }
  const ct = $("node-connection-rows");
  ct.replaceChildren();
  for (const x of c.connections || []) {
    const tr = el("tr");
    if (x.space && x.router) linkCell(tr, x.id, "#/spaces/" + enc(x.space) + "/connections/" + enc(x.router) + "/" + enc(x.id));
    else cell(tr, x.id);
    cell(tr, x.space);
    cell(tr, x.user || "(anonymous)");
    cell(tr, x.addr);
    cell(tr, x.container);
    cell(tr, fmt(x.links), "num");
    ct.appendChild(tr);
  }
  $("node-connections").hidden = !(c.connections || []).length;
  const at = $("node-address-rows");
  at.replaceChildren();
  for (const a of c.addresses || []) {
    const tr = el("tr");
    linkCell(tr, a.address, "#/spaces/" + enc(a.space) + "/addresses/" + enc(a.address));
    cell(tr, a.space);
    cell(tr, fmt(a.senders), "num");
    cell(tr, fmt(a.receivers), "num");
    cell(tr, fmt(a.rate), "num");
    cell(tr, fmt(a.stored), "num");
    at.appendChild(tr);
  }
  $("node-addresses").hidden = !(c.addresses || []).length;
  if (focus) $("node-h").focus();
}

// ---- address spaces ------------------------------------------------------------

async function loadSpaces(want) {
  const list = await api("GET", "/addressspaces");
  // The API lists only the caller's spaces; "default" is there without
  // being stored, for whoever may use it.
  const withDefault = isAdmin() || mySpaces().includes("default");
  const names = (withDefault ? ["default"] : []).concat(list.items.map((s) => s.metadata.name).filter((n) => n !== "default"));
  const ul = $("spaces");
  ul.replaceChildren();
  for (const n of names) {
    const li = el("li");
    const a = el("a", { href: "#/spaces/" + enc(n), "aria-current": n === want ? "page" : null }, n);
    li.appendChild(a);
    ul.appendChild(li);
  }
  if (!names.length) {
    space = null;
    $("space-h").textContent = "No address spaces for you";
    $("space-body").hidden = true;
    status("Your roles give you no address space on this console. Ask an administrator for an editor or viewer role.");
    return;
  }
  // Replaced, not pushed: Back does not come here again.
  if (!names.includes(want)) { location.replace("#/spaces/" + enc(names[0])); return; }
  if (want !== space || $("space-body").hidden) await pickSpace(want);
}

async function pickSpace(n) {
  space = n;
  $("space-h").textContent = "Address space " + n;
  $("space-body").hidden = false;
  // Deleting a space is the administrators'; changing what is in it, the
  // editors' too.
  $("delete-space").hidden = n === "default" || !isAdmin();
  const edit = canEdit(n);
  $("address-form").hidden = !edit;
  $("user-form").hidden = !edit;
  $("role-note").hidden = edit;
  pages = [null];
  page = 0;
  await Promise.all([loadAddresses(), loadUsers(), loadConnections(), loadUsage()]);
}

async function loadUsage() {
  const u = await api("GET", "/addressspaces/" + enc(space) + "/usage");
  $("plan").textContent = u.plan ? "Plan: " + u.plan : "No plan: no quotas but those set on the space.";
  const ul = $("quota-bars");
  ul.replaceChildren();
  const names = { addresses: "Addresses", connections: "Connections", links: "Links", storedBytes: "Stored bytes" };
  for (const [k, label] of Object.entries(names)) {
    const q = u.quotas[k];
    const li = el("li");
    const id = "quota-" + k;
    if (!q.limit) {
      li.textContent = label + ": " + fmt(q.used) + " (no limit)";
    } else {
      li.appendChild(el("label", { for: id }, label + ": " + fmt(q.used) + " of " + fmt(q.limit)));
      li.appendChild(el("meter", { id, min: "0", max: String(q.limit), value: String(q.used), low: String(q.limit * 0.6), high: String(q.limit * 0.9), optimum: "0" }));
    }
    ul.appendChild(li);
  }
  if (u.quotas.messageSize.limit) ul.appendChild(el("li", {}, "Largest message: " + fmt(u.quotas.messageSize.limit) + " bytes"));
}

async function loadAddresses() {
  const filter = $("filter").value.trim();
  let q = "?limit=" + PAGE + "&sort=" + sort.by + "&order=" + (sort.desc ? "desc" : "asc");
  if (pages[page]) q += "&continue=" + enc(pages[page]);
  if (filter) q += "&filter=" + enc(filter);
  const list = await api("GET", "/addressspaces/" + enc(space) + "/addresses" + q);
  pages[page + 1] = list.metadata.continue || null;
  $("next").disabled = !list.metadata.continue;
  $("prev").disabled = page === 0;
  const first = page * PAGE + 1;
  const total = list.metadata.total || 0;
  $("page").textContent = total ? first + "–" + (first + list.items.length - 1) + " of " + fmt(total) : "None";
  $("addr-count").textContent = "(" + fmt(total) + ")";
  for (const th of $("address-head").querySelectorAll("th[data-sort]")) {
    th.setAttribute("aria-sort", th.dataset.sort === sort.by ? (sort.desc ? "descending" : "ascending") : "none");
  }
  const tb = $("address-rows");
  tb.replaceChildren();
  for (const a of list.items) {
    const tr = el("tr", { "data-address": a.spec.address });
    linkCell(tr, a.metadata.name, "#/spaces/" + enc(space) + "/addresses/" + enc(a.metadata.name));
    cell(tr, a.spec.address);
    cell(tr, a.spec.type + (a.spec.topic ? " of " + a.spec.topic : ""));
    cell(tr, a.spec.broker || (a.status || {}).broker || "");
    for (const k of ["senders", "receivers", "delivered", "rate", "stored"]) cell(tr, "", "num " + k);
    const actions = el("td");
    if (a.spec.policy) tr.title = "Policy: " + JSON.stringify(a.spec.policy);
    if (a.spec.type === "queue") {
      const m = el("button", {}, "Messages");
      m.setAttribute("aria-label", "Messages in " + a.metadata.name);
      m.addEventListener("click", () => { location.hash = "#/spaces/" + enc(space) + "/addresses/" + enc(a.metadata.name) + "/messages"; });
      actions.appendChild(m);
    }
    if (canEdit(space) && ["queue", "topic", "subscription"].includes(a.spec.type)) {
      const p = el("button", { "aria-label": "Purge " + a.metadata.name }, "Purge");
      p.addEventListener("click", () => guarded(async () => {
        await api("POST", "/addressspaces/" + enc(space) + "/addresses/" + enc(a.metadata.name) + "/purge");
        status("Purge sent to the brokers.");
      }));
      actions.appendChild(p);
    }
    if (canEdit(space)) {
      const d = el("button", { class: "danger", "aria-label": "Delete address " + a.metadata.name }, "Delete");
      d.addEventListener("click", () => guarded(async () => {
        await api("DELETE", "/addressspaces/" + enc(space) + "/addresses/" + enc(a.metadata.name));
        await loadAddresses();
      }));
      actions.appendChild(d);
    }
    tr.appendChild(actions);
    tb.appendChild(tr);
  }
  await refreshMetrics();
}

// The live numbers of the addresses on this page only.
async function refreshMetrics() {
  const rows = $("address-rows").querySelectorAll("tr");
  if (!rows.length) return;
  const names = [...rows].map((tr) => tr.dataset.address);
  const m = await api("GET", "/addressspaces/" + enc(space) + "/metrics?addresses=" + names.map(enc).join(","));
  metrics = new Map(m.items.map((i) => [i.address, i]));
  for (const tr of rows) {
    const v = metrics.get(tr.dataset.address) || {};
    for (const k of ["senders", "receivers", "delivered", "rate", "stored"]) {
      const td = tr.querySelector("td." + k);
      const text = v[k] === undefined ? "0" : String(v[k]);
      if (td && td.textContent !== text) td.textContent = text;
    }
  }
}

async function loadUsers() {
  const list = await api("GET", "/addressspaces/" + enc(space) + "/users");
  const tb = $("user-rows");
  tb.replaceChildren();
  for (const u of list.items) {
    const tr = el("tr");
    cell(tr, u.spec.username);
    cell(tr, (u.spec.authorization || []).map((r) => r.operations.join("+") + " on " + r.addresses.join(", ")).join("; "));
    if (!canEdit(space)) { cell(tr, ""); tb.appendChild(tr); continue; }
    const b = button(tr, "Delete", () => guarded(async () => {
      await api("DELETE", "/addressspaces/" + enc(space) + "/users/" + enc(u.metadata.name));
      await loadUsers();
    }), true);
    b.setAttribute("aria-label", "Delete user " + u.spec.username);
    tb.appendChild(tr);
  }
}

async function loadConnections() {
  const list = await api("GET", "/addressspaces/" + enc(space) + "/connections");
  const tb = $("connection-rows");
  tb.replaceChildren();
  for (const c of list.items) {
    const tr = el("tr");
    cell(tr, c.router);
    cell(tr, c.protocol || "amqp");
    linkCell(tr, c.id, "#/spaces/" + enc(space) + "/connections/" + enc(c.router) + "/" + enc(c.id));
    cell(tr, c.user || "(anonymous)");
    cell(tr, c.addr);
    cell(tr, c.container);
    if (!canEdit(space)) { cell(tr, ""); tb.appendChild(tr); continue; }
    const b = button(tr, "Close", () => guarded(async () => {
      await api("POST", "/addressspaces/" + enc(space) + "/connections/" + enc(c.router) + "/" + c.id + "/close");
      status((c.gateway ? "The gateway" : "The router") + " closes it within a second or so.");
    }), true);
    b.setAttribute("aria-label", "Close connection " + c.id + " on " + c.router);
    tb.appendChild(tr);
  }
  const w = await api("GET", "/addressspaces/" + enc(space) + "/wills");
  $("wills").textContent = w.items.length === 0
    ? "No last-will service reports: wills are kept by the gateways."
    : w.items.map((s) => "Wills: " + s.held + " held, " + s.registered + " registered, " + s.cancelled +
        " cancelled; published " + s.fired.connectionLost + " on a lost connection, " + s.fired.gatewayLost +
        " on a lost gateway, " + s.fired.asked + " on request").join(" ");
}

function showTab(id) {
  for (const t of ["addresses", "users", "connections"]) {
    $("tab-" + t).setAttribute("aria-selected", String(t === id));
    $("tab-" + t).tabIndex = t === id ? 0 : -1;
    $(t).hidden = t !== id;
  }
}

// ---- an address ----------------------------------------------------------------

let addressShown = null;  // the address object on the address page

async function loadAddressPage() {
  const { space: s, name } = route;
  space = s;
  $("address-back").href = "#/spaces/" + enc(s);
  $("address-back").textContent = "Back to address space " + s;
  let a;
  try {
    a = await api("GET", "/addressspaces/" + enc(s) + "/addresses/" + enc(name));
  } catch (e) {
    if (e.status !== 404) throw e;
    // Not declared: anycast by default, or a queue a broker holds (a
    // dead-letter queue, say).
    a = { metadata: { name }, spec: { address: name, type: "undeclared" }, status: {} };
  }
  addressShown = a;
  $("address-h").textContent = "Address " + a.spec.address;
  const facts = [["Space", s], ["Type", a.spec.type + (a.spec.topic ? " of " + a.spec.topic : "")],
    ["Held by", a.spec.broker || (a.status || {}).broker || (["anycast", "multicast", "undeclared"].includes(a.spec.type) ? "the routers (direct)" : "not placed yet")],
    ["Phase", (a.status || {}).phase || ""]];
  if (a.spec.policy) facts.push(["Policy", JSON.stringify(a.spec.policy)]);
  const dl = $("address-facts");
  dl.replaceChildren();
  for (const [k, v] of facts) { dl.appendChild(el("dt", {}, k)); dl.appendChild(el("dd", {}, v)); }
  dl.appendChild(el("dt", {}, "Now"));
  dl.appendChild(el("dd", { id: "address-now" }, ""));
  $("address-queue").hidden = !["queue", "undeclared"].includes(a.spec.type);
  $("address-retry").hidden = !canEdit(s);
  $("address-purge").hidden = !canEdit(s);
  $("address-messages").hidden = true;
  await refreshAddressLive();
  if (route.messages) await addressMessages();
}

async function refreshAddressLive() {
  const a = addressShown;
  if (!a) return;
  const base = "/addressspaces/" + enc(route.space);
  const [h, m, links] = await Promise.all([
    api("GET", base + "/addresses/" + enc(a.metadata.name) + "/history"),
    api("GET", base + "/metrics?addresses=" + enc(a.spec.address)),
    api("GET", base + "/links"),
  ]);
  const secs = h.seconds || [];
  chart($("address-rate-chart"), [
    { name: "in", points: secs.map((x) => [x.t, x.in]) },
    { name: "out", points: secs.map((x) => [x.t, x.out]) },
  ], "messages/s");
  chart($("address-stored-chart"), [{ name: "stored", points: secs.map((x) => [x.t, x.stored]) }], "messages");
  const v = m.items[0] || {};
  $("address-now").textContent = fmt(v.senders) + " senders, " + fmt(v.receivers) + " receivers, " +
    (v.storedRate !== undefined ? fmt(v.storedRate) + " msg/s in, " : "") +
    fmt(v.rate) + " msg/s out, " + fmt(v.stored) + " stored" + (h.kept ? "" : " (no history kept: it was not busy lately)");
  const tb = $("address-link-rows");
  tb.replaceChildren();
  for (const l of links.items.filter((l) => l.address === a.spec.address)) {
    const tr = el("tr");
    cell(tr, l.dir === "in" ? "sender" : "receiver");
    linkCell(tr, l.connection, "#/spaces/" + enc(route.space) + "/connections/" + enc(l.router) + "/" + enc(l.connection));
    cell(tr, l.router);
    cell(tr, l.container || "");
    cell(tr, l.unsettled === undefined ? "" : l.unsettled, "num");
    tb.appendChild(tr);
  }
  if (!tb.children.length) {
    const tr = el("tr");
    tr.appendChild(el("td", { colspan: "5" }, "No senders or receivers."));
    tb.appendChild(tr);
  }
}

// ---- a connection ----------------------------------------------------------------

async function loadConnectionPage() {
  space = route.space;
  $("connection-back").href = "#/spaces/" + enc(route.space);
  $("connection-back").textContent = "Back to address space " + route.space;
  $("connection-h").textContent = "Connection " + route.id + " on " + route.router;
  $("connection-close").disabled = false;
  $("connection-close").hidden = !canEdit(route.space);
  await refreshConnectionLive();
}

async function refreshConnectionLive() {
  const base = "/addressspaces/" + enc(route.space);
  const [cs, links] = await Promise.all([api("GET", base + "/connections"), api("GET", base + "/links")]);
  const c = cs.items.find((x) => x.router === route.router && String(x.id) === String(route.id));
  const dl = $("connection-facts");
  dl.replaceChildren();
  if (!c) {
    dl.appendChild(el("dt", {}, "State"));
    dl.appendChild(el("dd", { id: "connection-state" }, "closed (no router reports it)"));
    $("connection-close").disabled = true;
  } else {
    for (const [k, v] of [["State", "open"], ["Protocol", c.protocol || "amqp"], ["Client address", c.addr], ["User", c.user || "(anonymous)"],
      ["Container", c.container], [c.gateway ? "Gateway" : "Router", c.router], ["Links", c.links === undefined ? "" : c.links],
      ["Messages in", c.in === undefined ? "" : fmt(c.in) + " (" + fmt(c.inRate) + "/s)"],
      ["Messages out", c.out === undefined ? "" : fmt(c.out) + " (" + fmt(c.outRate) + "/s)"]]) {
      dl.appendChild(el("dt", {}, k));
      dl.appendChild(el("dd", k === "State" ? { id: "connection-state" } : {}, v));
    }
  }
  const tb = $("connection-link-rows");
  tb.replaceChildren();
  for (const l of links.items.filter((l) => l.router === route.router && String(l.connection) === String(route.id))) {
    const tr = el("tr");
    cell(tr, l.dir === "in" ? "sends to" : "receives from");
    linkCell(tr, l.address, "#/spaces/" + enc(route.space) + "/addresses/" + enc(l.address));
    cell(tr, l.unsettled === undefined ? "" : l.unsettled, "num");
    tb.appendChild(tr);
  }
}

$("connection-close").addEventListener("click", () => guarded(async () => {
  await api("POST", "/addressspaces/" + enc(route.space) + "/connections/" + enc(route.router) + "/" + enc(route.id) + "/close");
  status("The router closes it within a second or so.");
}));

// ---- forms and buttons ---------------------------------------------------------

$("login-form").addEventListener("submit", (e) => { e.preventDefault(); login($("token").value.trim(), "admin"); });
$("logout").addEventListener("click", () => logout());
window.addEventListener("hashchange", () => { if (token && me) guarded(show); });
$("oidc-signin").addEventListener("click", () => signIn().catch((e) => { $("login-error").textContent = e.message; }));
$("space-form").addEventListener("submit", (e) => {
  e.preventDefault();
  guarded(async () => {
    const name = $("space-name").value.trim();
    await api("POST", "/addressspaces", {
      metadata: { name },
      spec: { authentication: { anonymous: $("space-anon").checked } },
    });
    $("space-name").value = "";
    location.hash = "#/spaces/" + enc(name);
  });
});
$("delete-space").addEventListener("click", () => guarded(async () => {
  if (!confirm("Delete address space " + space + " with its addresses and users?")) return;
  await api("DELETE", "/addressspaces/" + enc(space));
  space = null;
  location.hash = "#/spaces/default";
}));

function policyFromForm() {
  const policy = {};
  const text = (id, k) => { const v = $(id).value.trim(); if (v) policy[k] = v; };
  const num = (id, k) => { const v = $(id).value.trim(); if (v) policy[k] = Number(v); };
  text("pol-dla", "deadLetterAddress");
  num("pol-max-deliveries", "maxDeliveries");
  text("pol-expiry", "expiryAddress");
  num("pol-ttl", "defaultTtlMs");
  num("pol-depth", "maxDepth");
  num("pol-bytes", "maxBytes");
  text("pol-overflow", "overflow");
  return Object.keys(policy).length ? policy : null;
}

function queuePath(address) {
  return "/addressspaces/" + enc(space) + "/queues/" + enc(address);
}

// The first messages of the address page's queue (a dead-letter queue,
// say), each with where it came from and a Delete button.
async function addressMessages() {
  const address = addressShown.spec.address;
  const list = await api("GET", queuePath(address) + "/messages?limit=" + PAGE);
  $("address-messages").hidden = false;
  $("address-messages-caption").textContent = "Messages in " + address + " (" + list.items.length + " of " + list.depth + ")";
  const rows = $("address-message-rows");
  rows.replaceChildren();
  for (const m of list.items) {
    const tr = el("tr");
    cell(tr, m.id);
    cell(tr, m.deliveryCount);
    cell(tr, (m.annotations || {})["x-opt-flotilla-original-address"] || "");
    cell(tr, JSON.stringify(Object.assign({}, m.properties || {}, m.applicationProperties || {})));
    const body = m.body || {};
    cell(tr, body.text !== undefined ? body.text : body.base64 !== undefined ? "(binary) " + body.base64 : body.value || "");
    if (!canEdit(space)) { cell(tr, ""); rows.appendChild(tr); continue; }
    const b = button(tr, "Delete", () => guarded(async () => {
      await api("DELETE", queuePath(address) + "/messages/" + m.id);
      await addressMessages();
    }), true);
    b.setAttribute("aria-label", "Delete message " + m.id);
    rows.appendChild(tr);
  }
}

$("open-form").addEventListener("submit", (e) => {
  e.preventDefault();
  location.hash = "#/spaces/" + enc(space) + "/addresses/" + enc($("open-address").value.trim());
});
$("address-browse").addEventListener("click", () => guarded(addressMessages));
$("address-retry").addEventListener("click", () => guarded(async () => {
  const r = await api("POST", queuePath(addressShown.spec.address) + "/retry");
  await addressMessages();
  status("Moved back: " + r.moved + "; stayed (no origin known): " + r.skipped + ".");
}));
$("address-purge").addEventListener("click", () => guarded(async () => {
  if (!confirm("Remove every message waiting in " + addressShown.spec.address + "?")) return;
  const r = await api("POST", queuePath(addressShown.spec.address) + "/purge");
  await addressMessages();
  status("Purged " + r.purged + " message(s).");
}));

$("address-form").addEventListener("submit", (e) => {
  e.preventDefault();
  guarded(async () => {
    const spec = { address: $("addr-address").value.trim(), type: $("addr-type").value };
    if (spec.type === "subscription") spec.topic = $("addr-topic").value.trim();
    const policy = policyFromForm();
    if (policy) spec.policy = policy;
    await api("POST", "/addressspaces/" + enc(space) + "/addresses", { metadata: { name: $("addr-name").value.trim() }, spec });
    $("addr-name").value = "";
    $("addr-address").value = "";
    await loadAddresses();
  });
});
$("user-form").addEventListener("submit", (e) => {
  e.preventDefault();
  guarded(async () => {
    const operations = [...document.querySelectorAll("input[name=op]:checked")].map((i) => i.value);
    const addresses = $("user-addresses").value.split(",").map((s) => s.trim()).filter(Boolean);
    const username = $("user-name").value.trim();
    await api("POST", "/addressspaces/" + enc(space) + "/users", {
      metadata: { name: username.toLowerCase().replace(/[^a-z0-9-]/g, "-") },
      spec: { username, password: $("user-password").value, authorization: [{ addresses, operations }] },
    });
    $("user-name").value = "";
    $("user-password").value = "";
    await loadUsers();
  });
});
let filterTimer = null;
$("filter").addEventListener("input", () => {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(() => guarded(() => { pages = [null]; page = 0; return loadAddresses(); }), 250);
});
$("next").addEventListener("click", () => guarded(() => { page += 1; return loadAddresses(); }));
$("prev").addEventListener("click", () => guarded(() => { page = Math.max(0, page - 1); return loadAddresses(); }));
// Column headers sort: a button in each (twice: the other way round).
for (const th of $("address-head").querySelectorAll("th[data-sort]")) {
  const b = el("button", { class: "sort", type: "button" }, th.textContent);
  b.setAttribute("aria-label", "Sort by " + th.textContent.toLowerCase());
  th.replaceChildren(b);
  b.addEventListener("click", () => guarded(() => {
    sort = { by: th.dataset.sort, desc: sort.by === th.dataset.sort ? !sort.desc : false };
    pages = [null];
    page = 0;
    return loadAddresses();
  }));
}
// Tabs: a click, or the arrow keys between them.
const TABS = ["addresses", "users", "connections"];
for (const t of TABS) {
  $("tab-" + t).addEventListener("click", () => showTab(t));
  $("tab-" + t).addEventListener("keydown", (e) => {
    const i = TABS.indexOf(t);
    const j = e.key === "ArrowRight" ? (i + 1) % TABS.length : e.key === "ArrowLeft" ? (i + TABS.length - 1) % TABS.length : -1;
    if (j >= 0) { e.preventDefault(); showTab(TABS[j]); $("tab-" + TABS[j]).focus(); }
  });
}
showTab("addresses");

start().catch((e) => { $("login-error").textContent = e.message; });
