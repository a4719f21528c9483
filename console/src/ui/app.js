// Flotilla console: plain JavaScript over the REST API (/api/v1). No build
// step. The admin token stays in this tab's sessionStorage.
"use strict";

const PAGE = 50;
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("flotilla-token") || "";
let space = null;
let pages = [null];      // continue tokens of the pages seen
let page = 0;
let metrics = new Map();  // address -> live numbers
let timer = null;

async function api(method, path, body) {
  const r = await fetch("/api/v1" + path, {
    method,
    headers: Object.assign({ Authorization: "Bearer " + token },
      body ? { "Content-Type": "application/json" } : {}),
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await r.text();
  const data = text ? JSON.parse(text) : {};
  if (!r.ok) {
    const e = new Error(data.message || r.statusText);
    e.status = r.status;
    throw e;
  }
  return data;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function button(row, label, onClick, danger) {
  const td = document.createElement("td");
  const b = document.createElement("button");
  b.textContent = label;
  if (danger) b.className = "danger";
  b.addEventListener("click", onClick);
  td.appendChild(b);
  row.appendChild(td);
  return b;
}

function status(msg) { $("status").textContent = msg || ""; }

async function guarded(f) {
  try { status(""); await f(); } catch (e) {
    if (e.status === 401) return logout("The token was refused.");
    status(e.message);
  }
}

async function login(t) {
  token = t;
  try {
    await api("GET", "/addressspaces?limit=1");
  } catch (e) {
    $("login-error").textContent = e.status === 401 ? "That is not the admin token." : e.message;
    token = "";
    return;
  }
  sessionStorage.setItem("flotilla-token", token);
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  $("who").textContent = "admin";
  await loadSpaces();
  if (!timer) timer = setInterval(refreshLive, 1000);
}

function logout(msg) {
  sessionStorage.removeItem("flotilla-token");
  token = "";
  $("app").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("who").textContent = "";
  $("login-error").textContent = msg || "";
  if (timer) { clearInterval(timer); timer = null; }
}

async function loadSpaces() {
  const list = await api("GET", "/addressspaces");
  const names = ["default"].concat(list.items.map((s) => s.metadata.name).filter((n) => n !== "default"));
  const ul = $("spaces");
  ul.replaceChildren();
  for (const n of names) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.textContent = n;
    b.setAttribute("aria-current", String(n === space));
    b.addEventListener("click", () => guarded(() => pickSpace(n)));
    li.appendChild(b);
    ul.appendChild(li);
  }
  if (space === null || !names.includes(space)) await pickSpace(names[0]);
}

async function pickSpace(n) {
  space = n;
  for (const b of $("spaces").querySelectorAll("button")) b.setAttribute("aria-current", String(b.textContent === n));
  $("space-h").textContent = "Address space " + n;
  $("space-body").hidden = false;
  $("delete-space").hidden = n === "default";
  pages = [null];
  page = 0;
  await Promise.all([loadAddresses(), loadUsers(), loadConnections(), refreshLive()]);
}

function enc(s) { return encodeURIComponent(s); }

async function loadAddresses() {
  const filter = $("filter").value.trim();
  let q = "?limit=" + PAGE;
  if (pages[page]) q += "&continue=" + enc(pages[page]);
  if (filter) q += "&filter=" + enc(filter);
  const list = await api("GET", "/addressspaces/" + enc(space) + "/addresses" + q);
  pages[page + 1] = list.metadata.continue || null;
  $("next").disabled = !list.metadata.continue;
  $("prev").disabled = page === 0;
  $("page").textContent = "Page " + (page + 1);
  $("addr-count").textContent = "(" + list.items.length + " on this page)";
  const tb = $("address-rows");
  tb.replaceChildren();
  for (const a of list.items) {
    const tr = document.createElement("tr");
    tr.dataset.address = a.spec.address;
    cell(tr, a.metadata.name);
    cell(tr, a.spec.address);
    cell(tr, a.spec.type + (a.spec.topic ? " of " + a.spec.topic : ""));
    for (const k of ["senders", "receivers", "delivered", "rate", "stored"]) cell(tr, "", "num " + k);
    const actions = document.createElement("td");
    if (a.spec.policy) tr.title = "Policy: " + JSON.stringify(a.spec.policy);
    if (a.spec.type === "queue") {
      const m = document.createElement("button");
      m.textContent = "Messages";
      m.addEventListener("click", () => guarded(() => browse(a.spec.address)));
      actions.appendChild(m);
    }
    if (["queue", "topic", "subscription"].includes(a.spec.type)) {
      const p = document.createElement("button");
      p.textContent = "Purge";
      p.addEventListener("click", () => guarded(async () => {
        await api("POST", "/addressspaces/" + enc(space) + "/addresses/" + enc(a.metadata.name) + "/purge");
        status("Purge sent to the brokers.");
      }));
      actions.appendChild(p);
    }
    const d = document.createElement("button");
    d.textContent = "Delete";
    d.className = "danger";
    d.setAttribute("aria-label", "Delete address " + a.metadata.name);
    d.addEventListener("click", () => guarded(async () => {
      await api("DELETE", "/addressspaces/" + enc(space) + "/addresses/" + enc(a.metadata.name));
      await loadAddresses();
    }));
    actions.appendChild(d);
    tr.appendChild(actions);
    tb.appendChild(tr);
  }
  paintMetrics();
}

function paintMetrics() {
  for (const tr of $("address-rows").querySelectorAll("tr")) {
    const m = metrics.get(tr.dataset.address) || {};
    for (const k of ["senders", "receivers", "delivered", "rate", "stored"]) {
      const td = tr.querySelector("td." + k);
      if (td) td.textContent = m[k] === undefined ? "0" : String(m[k]);
    }
  }
}

async function refreshLive() {
  if (!space || !token) return;
  try {
    const m = await api("GET", "/addressspaces/" + enc(space) + "/metrics");
    metrics = new Map(m.items.map((i) => [i.address, i]));
    paintMetrics();
    if (!$("connections").hidden) await loadConnections();
  } catch (e) {
    if (e.status === 401) logout("The token was refused.");
  }
}

async function loadUsers() {
  const list = await api("GET", "/addressspaces/" + enc(space) + "/users");
  const tb = $("user-rows");
  tb.replaceChildren();
  for (const u of list.items) {
    const tr = document.createElement("tr");
    cell(tr, u.spec.username);
    cell(tr, (u.spec.authorization || []).map((r) => r.operations.join("+") + " on " + r.addresses.join(", ")).join("; "));
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
    const tr = document.createElement("tr");
    cell(tr, c.router);
    cell(tr, c.protocol || "amqp");
    cell(tr, c.id);
    cell(tr, c.user || "(anonymous)");
    cell(tr, c.addr);
    cell(tr, c.container);
    button(tr, "Close", () => guarded(async () => {
      await api("POST", "/addressspaces/" + enc(space) + "/connections/" + enc(c.router) + "/" + c.id + "/close");
      status((c.gateway ? "The gateway" : "The router") + " closes it within a second or so.");
    }), true);
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
    $(t).hidden = t !== id;
  }
}

$("login-form").addEventListener("submit", (e) => { e.preventDefault(); login($("token").value.trim()); });
$("logout").addEventListener("click", () => logout());
$("space-form").addEventListener("submit", (e) => {
  e.preventDefault();
  guarded(async () => {
    const name = $("space-name").value.trim();
    await api("POST", "/addressspaces", {
      metadata: { name },
      spec: { authentication: { anonymous: $("space-anon").checked } },
    });
    $("space-name").value = "";
    space = name;
    await loadSpaces();
    await pickSpace(name);
  });
});
$("delete-space").addEventListener("click", () => guarded(async () => {
  if (!confirm("Delete address space " + space + " with its addresses and users?")) return;
  await api("DELETE", "/addressspaces/" + enc(space));
  space = null;
  await loadSpaces();
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

// The first messages of a queue (a dead-letter queue, say), each with
// where it came from and a Delete button.
async function browse(address) {
  $("browse-address").value = address;
  const list = await api("GET", queuePath(address) + "/messages?limit=" + PAGE);
  $("browse").hidden = false;
  $("browse-retry").hidden = false;
  $("browse-purge").hidden = false;
  $("browse-caption").textContent = "Messages in " + address + " (" + list.items.length + " of " + list.depth + ")";
  const tb = $("browse-rows");
  tb.replaceChildren();
  for (const m of list.items) {
    const tr = document.createElement("tr");
    cell(tr, m.id);
    cell(tr, m.deliveryCount);
    cell(tr, (m.annotations || {})["x-opt-flotilla-original-address"] || "");
    cell(tr, JSON.stringify(Object.assign({}, m.properties || {}, m.applicationProperties || {})));
    const body = m.body || {};
    cell(tr, body.text !== undefined ? body.text : body.base64 !== undefined ? "(binary) " + body.base64 : body.value || "");
    button(tr, "Delete", () => guarded(async () => {
      await api("DELETE", queuePath(address) + "/messages/" + m.id);
      await browse(address);
    }), true);
    tb.appendChild(tr);
  }
}

$("browse-form").addEventListener("submit", (e) => {
  e.preventDefault();
  guarded(() => browse($("browse-address").value.trim()));
});
$("browse-retry").addEventListener("click", () => guarded(async () => {
  const address = $("browse-address").value.trim();
  const r = await api("POST", queuePath(address) + "/retry");
  status("Moved back: " + r.moved + "; stayed (no origin known): " + r.skipped + ".");
  await browse(address);
}));
$("browse-purge").addEventListener("click", () => guarded(async () => {
  const address = $("browse-address").value.trim();
  if (!confirm("Remove every message waiting in " + address + "?")) return;
  const r = await api("POST", queuePath(address) + "/purge");
  await browse(address);
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
for (const t of ["addresses", "users", "connections"]) $("tab-" + t).addEventListener("click", () => showTab(t));

if (token) login(token); else $("token").focus();
