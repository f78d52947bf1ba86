// Veil console page: renders /api/state and sends actions. No framework, nothing downloaded.
// Every value from the server is inserted as text (textContent), never as HTML.
"use strict";

const TOKEN_KEY = "veil-console-token";
const REFRESH_MS = 10000;

// The token arrives in the URL fragment (never sent to a server); keep it for this tab only and
// take it out of the address bar.
function accessToken() {
  const match = location.hash.match(/token=([A-Za-z0-9_-]+)/);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, match[1]);
    history.replaceState(null, "", location.pathname);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

const TOKEN = accessToken();

async function api(path, { method = "GET", json, body, type } = {}) {
  const headers = { Authorization: `Bearer ${TOKEN}` };
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (type) {
    headers["Content-Type"] = type;
  }
  const response = await fetch(path, { method, headers, body, credentials: "omit", cache: "no-store" });
  let answer = null;
  try {
    answer = await response.json();
  } catch (_) {
    answer = null;
  }
  if (!response.ok) {
    const err = (answer && answer.error) || {};
    throw new Error(`${err.code || response.status}: ${err.message || response.statusText}`);
  }
  return answer;
}

// -- small DOM helpers ---------------------------------------------------------------------------

function h(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "title") node.title = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const $ = (id) => document.getElementById(id);
const HEX_ID = /[0-9a-f]{64}/g;
// principal ids and measurements (64 hex digits) shortened for reading; the full id is the title
const short = (id) => (id ? String(id).replace(HEX_ID, (m) => `${m.slice(0, 12)}…`) : "");
const iso = (ts) => (ts ? new Date(ts * 1000).toISOString().replace(/\.\d+Z$/, "Z") : "");
const num = (v, digits = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function dl(node, pairs) {
  node.replaceChildren(...pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function badge(ok, text) {
  return h("span", { class: ok ? "badge ok" : "badge bad" }, text);
}

function flash(text, ok = true) {
  const box = $("message");
  box.textContent = text;
  box.className = ok ? "message ok" : "message bad";
  box.hidden = false;
}

// -- rendering -------------------------------------------------------------------------------

let state = null;

function renderIdentity(s) {
  const rows = Object.entries(s.principals).map(([role, p]) => [role, h("code", { class: "id" }, p.id)]);
  const att = s.attestation;
  rows.push([
    "KeyService",
    h("span", {}, att.verified
      ? badge(true, "attestation verified against your trust anchors")
      : badge(false, `not verified: ${att.error}`), " ", h("code", {}, s.console.keyservice_url)),
  ]);
  rows.push(["gateway", h("code", {}, s.console.gateway_url)]);
  rows.push(["client dir", h("code", {}, s.console.client_dir)]);
  rows.push(["deployment", h("span", {}, h("code", {}, s.console.deployment), " (addresses only, trusted for nothing)")]);
  dl($("identity"), rows);
  $("who").replaceChildren(
    ...Object.entries(s.principals).map(([role, p]) => h("span", { class: "role" }, `${role} ${short(p.id)}`))
  );
}

function measurementList(values) {
  if (!values || !values.length) return h("span", { class: "hint" }, "none");
  return h("ul", { class: "plain" }, values.map((m) => h("li", {}, h("code", { title: m }, m))));
}

function renderTrust(t) {
  dl($("trust"), [
    ["KeyService measurements", measurementList(t.keyservice_measurements)],
    ["runtime measurements your keys may reach", measurementList(t.runtime_measurements)],
    ["simulated TEEs", t.allow_simulated ? badge(false, "accepted (development only)") : badge(true, "refused")],
    ["simulation roots", measurementList(t.sim_roots)],
    ["file", h("code", {}, t.file)],
  ]);
}

function tensorRows(specs) {
  return specs.map((t) => h("tr", {}, h("td", {}, h("code", {}, t.name)), h("td", {}, t.describe)));
}

function renderCard(m) {
  if (m.card_error) return h("p", { class: "bad-text" }, `card: ${m.card_error}`);
  if (!m.card) return null;
  const c = m.card;
  return h(
    "div",
    { class: "card" },
    h("div", { class: "card-head" },
      badge(true, `card v${c.version} signed by owner ${short(c.owner)} · verified`),
      h("span", { class: "mode" }, `mode ${c.mode.toUpperCase()}`)),
    c.description ? h("p", { class: "description" }, c.description) : null,
    h("div", { class: "tensors" },
      h("table", { class: "mini" }, h("caption", {}, "inputs"), h("tbody", {}, tensorRows(c.inputs))),
      h("table", { class: "mini" }, h("caption", {}, "outputs"), h("tbody", {}, tensorRows(c.outputs)))),
  );
}

function renderModel(m, s) {
  if (m.error) {
    return h("article", { class: "model", "data-model": m.id }, h("h3", {}, m.id), h("p", { class: "bad-text" }, m.error));
  }
  const versions = (m.versions || []).map((v) =>
    h("li", {}, `v${v.version}`,
      v.current_at ? ` current since ${iso(v.current_at)}` : v.staged_at ? ` staged ${iso(v.staged_at)}` : "",
      v.revocation_delay_s !== undefined ? ` · delay ${v.revocation_delay_s} s` : ""));
  const allowed = m.owner_measurements;
  const rel = m.releases || {};
  const facts = [
    ["owner", h("span", {}, h("code", { title: m.owner }, short(m.owner)), m.owned_by_me ? " (you)" : "")],
    ["current version", m.current_version ? `v${m.current_version}` : "none yet"],
    ["revocation delay", `${m.revocation_delay_s} s`],
    ["versions", versions.length ? h("ul", { class: "plain" }, versions) : h("span", { class: "hint" }, "no record here")],
    ["runtime measurements the owner allows",
      allowed ? h("span", {}, measurementList(allowed.measurements), h("span", { class: "hint" }, `since ${iso(allowed.since)} (${allowed.source})`))
        : h("span", { class: "hint" }, "no record here (the audit log or this console's publishes say)")],
    ["key releases to runtimes", `${rel.allowed || 0} allowed, ${rel.refused || 0} refused${rel.last_refusal ? ` (last: ${rel.last_refusal})` : ""}`],
  ];
  if ("request_key" in m) facts.push(["your request key", m.request_key ? "registered (kept in request-keys.json)" : "none"]);
  const list = h("dl", { class: "facts" });
  dl(list, facts);
  return h("article", { class: "model", "data-model": m.id },
    h("h3", {}, m.id, " ", h("span", { class: "version" }, m.current_version ? `v${m.current_version}` : "")),
    h("div", { class: "model-body" }, list, renderCard(m)));
}

function renderModels(s) {
  const models = s.models;
  $("models").replaceChildren(
    ...(models.length
      ? models.map((m) => renderModel(m, s))
      : [h("p", { class: "hint" }, "No model known yet: publish one, or add one by id (models published elsewhere are not listed by the KeyService).")])
  );
  $("model-ids").replaceChildren(...models.map((m) => h("option", { value: m.id })));
}

function renderGrants(s) {
  const rows = s.grants.map((g) => {
    let effect = "now";
    if (!g.granted) {
      const left = g.effective_by - s.now;
      effect = g.effective_by
        ? `${left > 0 ? `within ${Math.ceil(left)} s, ` : "in effect since "}${iso(g.effective_by)}`
        : "within the model's delay";
    }
    const revoke = g.owned_by_me && g.granted
      ? h("button", { type: "button", class: "revoke", onclick: () => act("revoke", { model: g.model, user: g.user }) }, "Revoke")
      : null;
    return h("tr", { "data-model": g.model, "data-user": g.user, class: g.granted ? "granted" : "revoked" },
      h("td", {}, g.model),
      h("td", {}, h("code", { title: g.user }, short(g.user))),
      h("td", {}, g.granted ? badge(true, "granted") : badge(false, "revoked")),
      h("td", { class: "time" }, iso(g.since)),
      h("td", {}, g.revocation_delay_s === null || g.revocation_delay_s === undefined ? "–" : `${g.revocation_delay_s} s`),
      h("td", {}, effect),
      h("td", {}, g.sources.join(", ")),
      h("td", {}, revoke));
  });
  fill($("grants").tBodies[0], rows);
  const empty = $("grants-empty");
  empty.hidden = rows.length > 0;
  empty.textContent = s.audit.available
    ? "No grants yet."
    : "No grants recorded by this console; the audit log is not readable here, so grants made elsewhere are not shown.";
}

function renderUsage(s) {
  const own = Object.entries(s.usage.console).map(([model, u]) =>
    h("tr", { "data-model": model },
      h("td", {}, model), h("td", {}, u.requests), h("td", {}, u.ok), h("td", {}, u.errors),
      h("td", {}, `${num(u.round_trip_ms.p50)} / ${num(u.round_trip_ms.p90)} / ${num(u.round_trip_ms.max)}`),
      h("td", {}, num(u.runtime_ms.p50, 2)), h("td", {}, u.last_error)));
  fill($("usage-console").tBodies[0], own.length ? own : [h("tr", {}, h("td", { colspan: 7, class: "hint" }, "No request sent from this console yet (each user's console times the requests it sends)."))]);
  const g = s.usage.gateway;
  const modes = Object.entries(g.prometheus || {}).map(([mode, r]) =>
    h("tr", {}, h("td", {}, mode), h("td", {}, r.ok), h("td", {}, r.error), h("td", {}, num(r.mean_ms, 2)),
      h("td", {}, r.p50_le_ms ?? "–"), h("td", {}, r.p90_le_ms ?? "–")));
  const note = g.prometheus_error || (modes.length ? null : "no inference through the gateway yet");
  fill($("usage-gateway").tBodies[0], note ? [...modes, h("tr", {}, h("td", { colspan: 6, class: "hint" }, note))] : modes);
}

function renderPlatform(s) {
  const g = s.usage.gateway;
  if (!g.platform) {
    $("billing").replaceChildren(h("span", { class: "bad-text" }, g.platform_error || "no platform metrics"));
    fill($("platform").tBodies[0], []);
    return;
  }
  const p = g.platform;
  const b = p.billing;
  const totals = p.totals || {};
  $("billing").replaceChildren(
    h("span", { class: "figure" }, h("b", {}, totals.instances ?? 0), " instances now"),
    h("span", { class: "figure" }, h("b", {}, totals.cold_starts ?? 0), " cold starts"),
    h("span", { class: "figure" }, h("b", {}, totals.requests ?? 0), " requests"),
    h("span", { class: "figure" }, h("b", {}, num(b.gb_seconds, 2)), " GB-s billed"),
    h("span", { class: "figure" }, b.cost === null ? "no price set" : h("span", {}, h("b", {}, `$${b.cost.toFixed(6)}`), ` at $${b.price_per_gb_s}/GB-s`)),
  );
  const rows = Object.entries(p.functions).map(([name, f]) =>
    h("tr", {}, h("td", {}, name), h("td", {}, f.instances), h("td", {}, f.peak_instances), h("td", {}, f.cold_starts),
      h("td", {}, f.requests), h("td", {}, num(f.exec_ms && f.exec_ms.p50, 2)), h("td", {}, num(f.cold_start_ms && f.cold_start_ms.p50, 0)),
      h("td", {}, `${f.memory_mb} MB`), h("td", {}, num(f.gb_seconds, 2))));
  fill($("platform").tBodies[0], rows.length ? rows : [h("tr", {}, h("td", { colspan: 9, class: "hint" }, "No function has started yet (scale to zero)."))]);
}

function renderAudit(s) {
  const a = s.audit;
  const status = $("audit-status");
  if (!a.available) {
    status.replaceChildren(badge(false, "not available here"), " ", a.reason);
    fill($("audit").tBodies[0], []);
    return;
  }
  status.replaceChildren(
    badge(a.chain_ok, a.chain_message || (a.chain_ok ? "chain OK" : "chain not verified")),
    " ",
    a.policy_ok === null ? "" : badge(a.policy_ok, a.policy_ok ? "policy rows OK" : `policy rows altered: ${a.policy_problems.join("; ")}`),
    h("span", { class: "hint" }, ` verified by \`veil keyservice audit\` on ${a.state_dir}; last ${a.entries.length} of ${a.total} entries`),
  );
  const mine = new Set(Object.values(s.principals).map((p) => p.id));
  const rows = a.entries.slice().reverse().map((e) =>
    h("tr", { class: mine.has(e.actor) ? "mine" : "" },
      h("td", {}, e.n), h("td", { class: "time" }, iso(e.ts)),
      h("td", { title: e.actor }, mine.has(e.actor) ? "you" : short(e.actor)),
      h("td", {}, e.action), h("td", { title: e.subject || "" }, short(e.subject)), h("td", {}, e.outcome || ""),
      h("td", {}, e.reason || (e.measurement ? short(e.measurement) : ""))));
  fill($("audit").tBodies[0], rows);
}

function renderActivity(s) {
  fill($("activity").tBodies[0], s.activity.map((e) => {
    const detail = [
      e.user ? `user ${short(e.user)}` : "",
      e.version ? `v${e.version}` : "",
      e.replaced_version ? `replaced v${e.replaced_version}` : "",
      e.revocation_delay_s !== undefined && e.revocation_delay_s !== null ? `delay ${e.revocation_delay_s} s` : "",
    ].filter(Boolean).join(" · ");
    return h("tr", {}, h("td", { class: "time" }, iso(e.ts)), h("td", {}, e.action), h("td", {}, e.model || ""), h("td", {}, detail));
  }));
}

function render(s) {
  state = s;
  $("owner-panel").hidden = !("owner" in s.principals);
  $("user-panel").hidden = !("user" in s.principals);
  renderIdentity(s);
  renderTrust(s.trust);
  renderModels(s);
  renderGrants(s);
  renderUsage(s);
  renderPlatform(s);
  renderAudit(s);
  renderActivity(s);
  document.body.dataset.loadedAt = String(s.now);
}

let loading = null;

async function refresh() {
  if (loading) return loading;
  loading = (async () => {
    try {
      render(await api("/api/state"));
      $("main").hidden = false;
    } catch (err) {
      flash(`could not load the console's state: ${err.message}`, false);
    } finally {
      loading = null;
    }
  })();
  return loading;
}

// -- actions --------------------------------------------------------------------------------

const ACTIONS = {
  grant: (b) => api("/api/owner/grant", { method: "POST", json: b }),
  revoke: (b) => api("/api/owner/revoke", { method: "POST", json: b }),
  access: (b) => api("/api/user/request-access", { method: "POST", json: b }),
  infer: (b) => api("/api/user/infer", { method: "POST", json: b }),
  watch: (b) => api("/api/watch", { method: "POST", json: b }),
};

function describe(kind, r) {
  switch (kind) {
    case "grant": return `granted ${short(r.user)} on ${r.model}`;
    case "revoke": {
      const within = r.revocation_delay_s === null ? "the model's revocation delay" : `${r.revocation_delay_s} s`;
      return `revoked ${short(r.user)} on ${r.model}: takes effect within ${within}`;
    }
    case "access": return `request key registered for ${r.model}`;
    case "watch": return `watching ${r.model}`;
    case "infer": return `${r.model}: decrypted answer in ${num(r.timings.round_trip_ms)} ms`;
    default: return "done";
  }
}

async function act(kind, body) {
  flash(`${kind}…`);
  try {
    const result = await ACTIONS[kind](body);
    flash(describe(kind, result));
    if (kind === "infer") {
      const out = $("infer-result");
      out.textContent = Object.entries(result.outputs)
        .map(([name, o]) => `${name} (${o.dtype} [${o.shape.join(", ")}]): ${JSON.stringify(o.values)}`)
        .join("\n");
      out.hidden = false;
    }
    await refresh();
    return result;
  } catch (err) {
    flash(`${kind} failed: ${err.message}`, false);
    return null;
  }
}

async function publish(event) {
  event.preventDefault();
  const file = $("publish-file").files[0];
  const params = new URLSearchParams({ model: $("publish-model").value.trim() });
  if ($("publish-delay").value !== "") params.set("revocation_delay_s", $("publish-delay").value);
  if ($("publish-description").value) params.set("description", $("publish-description").value);
  const button = $("publish-button");
  button.disabled = true;
  flash(`publishing ${params.get("model")} (${file.size} bytes): staging, sealing, signed upload, signed card, commit…`);
  try {
    const r = await api(`/api/owner/publish?${params}`, { method: "POST", body: file, type: "application/octet-stream" });
    const replaced = r.replaced_version ? ` (replaces v${r.replaced_version})` : "";
    flash(`published ${r.model} v${r.version}${replaced}: ${r.plaintext_bytes} bytes sealed to ${r.sealed_bytes}; revocation delay ${r.revocation_delay_s} s`);
    await refresh();
  } catch (err) {
    flash(`publish failed: ${err.message}`, false);
  } finally {
    button.disabled = false;
  }
}

function onSubmit(id, handler) {
  $(id).addEventListener("submit", (event) => {
    event.preventDefault();
    handler();
  });
}

function start() {
  if (!TOKEN) {
    $("no-token").hidden = false;
    return;
  }
  $("publish-form").addEventListener("submit", publish);
  onSubmit("grant-form", () => act("grant", { model: $("grant-model").value.trim(), user: $("grant-user").value.trim() }));
  onSubmit("access-form", () => act("access", { model: $("access-model").value.trim(), max_revocation_delay_s: $("access-delay").value }));
  onSubmit("infer-form", () => act("infer", { model: $("infer-model").value.trim(), inputs: $("infer-inputs").value }));
  onSubmit("watch-form", () => act("watch", { model: $("watch-model").value.trim() }));
  $("refresh").addEventListener("click", () => refresh());
  setInterval(() => {
    if ($("auto-refresh").checked && !document.hidden) refresh();
  }, REFRESH_MS);
  refresh();
}

document.addEventListener("DOMContentLoaded", start);
