// imsys dashboard: plain JavaScript, no build step, no dependencies.
// Every value from the server reaches the page through textContent or an attribute,
// never as HTML.
"use strict";

(() => {
  const REFRESH_MS = 2500;
  const TOKEN_KEY = "imsys.token";
  const STREAMS = ["sync", "billing", "events", "bouncer"];

  const $ = (id) => document.getElementById(id);
  const state = {
    token: null,
    timer: null,
    busy: false,
    prev: null, // {t, processed: {stream: n}} of the previous queues read
    rates: {},
    routers: new Map(), // id -> name
    subs: { q: "", status: "", offset: 0, limit: 50, total: 0 },
    rendered: {}, // table id -> key of what it shows (skip identical re-renders)
  };

  // --- DOM helpers ---------------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else if (key.startsWith("data-") || key === "title" || key === "type") {
        node.setAttribute(key, String(value));
      } else if (key === "style") node.style.cssText = value;
      else node[key] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const td = (text, cls, title) => el("td", { class: cls, text: text ?? "", title });
  const badge = (text, kind) => el("span", { class: `pill state-${kind}`, text });

  function fill(tableId, key, rows) {
    // Re-render only when the data changed, so a row's button is not replaced under the
    // operator's pointer between two refreshes.
    if (state.rendered[tableId] === key) return;
    state.rendered[tableId] = key;
    $(tableId).tBodies[0].replaceChildren(...rows);
    const empty = document.querySelector(`[data-empty="${tableId}"]`);
    if (empty) empty.hidden = rows.length > 0;
  }

  function showError(name, message) {
    const node = document.querySelector(`[data-error="${name}"]`);
    if (node) node.textContent = message || "";
  }

  let toastTimer = null;
  function toast(message) {
    const node = $("toast");
    node.textContent = message;
    node.classList.add("show");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => node.classList.remove("show"), 2500);
  }

  // --- formatting ----------------------------------------------------------------------

  function duration(seconds) {
    if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "–";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  function when(value) {
    // ISO text or epoch milliseconds -> "12s ago" / "in 3m 4s".
    if (value === null || value === undefined || value === "") return "–";
    const ms = typeof value === "number" || /^\d+$/.test(value) ? Number(value) : Date.parse(value);
    if (Number.isNaN(ms)) return String(value);
    const delta = (Date.now() - ms) / 1000;
    return delta >= 0 ? `${duration(delta)} ago` : `in ${duration(-delta)}`;
  }

  const absolute = (value) => {
    const ms = /^\d+$/.test(String(value)) ? Number(value) : Date.parse(value);
    return Number.isNaN(ms) ? "" : new Date(ms).toISOString();
  };

  const count = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en"));

  // --- API -----------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${state.token}` };
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(path, init);
    let data = null;
    try {
      data = await resp.json();
    } catch (_) {
      data = null;
    }
    if (resp.status === 401) {
      logout("The token was refused; sign in again.");
      throw new ApiError(401, "unauthorised");
    }
    if (!resp.ok) {
      const message = data && typeof data.error === "string" ? data.error : resp.statusText;
      throw new ApiError(resp.status, `${resp.status}: ${message}`);
    }
    return data;
  }

  // --- sections ------------------------------------------------------------------------

  async function health() {
    const node = $("health");
    try {
      const resp = await fetch("/healthz", { cache: "no-store" });
      const data = await resp.json();
      const ok = resp.ok && data.ok;
      node.className = `pill ${ok ? "pill-ok" : "pill-bad"}`;
      node.textContent = ok
        ? `healthy · engine ${data.engine}`
        : `unhealthy · redis ${data.redis} · postgres ${data.postgres}`;
    } catch (_) {
      node.className = "pill pill-bad";
      node.textContent = "admin server not answering";
    }
  }

  async function queues() {
    const data = await api("GET", "/api/queues");
    const now = performance.now();
    const processed = {};
    for (const s of data.streams) processed[s.stream] = Number(s.processed);
    if (state.prev) {
      const seconds = (now - state.prev.t) / 1000;
      for (const [stream, n] of Object.entries(processed)) {
        const before = state.prev.processed[stream];
        // A counter that went down was reset: no rate this round.
        state.rates[stream] =
          before === undefined || n < before || seconds <= 0 ? null : (n - before) / seconds;
      }
    }
    state.prev = { t: now, processed };
    const byName = new Map(data.streams.map((s) => [s.stream, s]));
    const names = [...STREAMS, ...data.streams.map((s) => s.stream).filter((n) => !STREAMS.includes(n))];
    const rows = names
      .filter((name) => byName.has(name))
      .map((name) => {
        const s = byName.get(name);
        const rate = state.rates[name];
        const age = s.oldest_pending_age_s;
        return el(
          "tr",
          { "data-stream": name, "data-paused": s.paused ? "true" : "false" },
          streamControl(name, s.paused === true),
          td(count(s.length), "num"),
          td(count(s.pending), "num"),
          td(count(s.lag), "num"),
          td(count(s.delayed), "num"),
          td(duration(age), age > 60 ? "num hot" : "num"),
          td(rate === null || rate === undefined ? "–" : rate.toFixed(1), "num"),
          td(count(s.processed), "num"),
          td(count(s.retried), "num"),
          td(count(s.dead), s.dead > 0 ? "num hot" : "num"),
        );
      });
    // Rates change every round even when the figures do not: always re-render.
    fill("streams", `${now}`, rows);
    const procs = data.processes || [];
    $("processes").textContent =
      `${procs.length} live process${procs.length === 1 ? "" : "es"}` +
      (procs.length ? `: ${procs.map((p) => p.consumer).join(", ")}` : "");
    $("dead-count").textContent = data.dead_letters ? String(data.dead_letters) : "";
  }

  // A paused stream accepts jobs and runs none, in every process: its badge and the
  // button that pauses or resumes it.
  function streamControl(name, paused) {
    return el(
      "td",
      { class: "stream-name" },
      name,
      paused ? badge("paused", "paused") : null,
      el("button", {
        type: "button",
        class: paused ? "" : "ghost",
        text: paused ? "Resume" : "Pause",
        "data-pause": name,
        "data-resume": paused ? "true" : "false",
      }),
    );
  }

  async function routers() {
    const data = await api("GET", "/api/routers");
    state.routers = new Map(data.routers.map((r) => [r.id, r.name]));
    const rows = data.routers.flatMap((r) => {
      const online = r.online === true ? "online" : r.online === false ? "offline" : "unknown";
      const row = el(
        "tr",
        { "data-router": r.id },
        el(
          "td",
          {},
          r.name,
          // In maintenance: imsys leaves the router alone until then (its jobs wait).
          r.maintenance_until
            ? el("span", {
              class: "pill state-maintenance",
              "data-maintenance": r.id,
              text: `maintenance, ends ${when(r.maintenance_until)}`,
              title: absolute(r.maintenance_until),
            })
            : null,
          el("div", { class: "muted small code", text: `${r.host}:${r.port}` }),
        ),
        el("td", { title: r.last_error || null }, badge(online, online)),
        td(r.version || "–"),
        td(r.uptime || "–"),
        td(when(r.last_seen_at), null, r.last_seen_at ? absolute(r.last_seen_at) : null),
        el("td", {}, badge(r.circuit || "closed", r.circuit || "closed")),
      );
      const guard = guardRow(r);
      return guard ? [row, guard] : [row];
    });
    fill("routers", JSON.stringify([data.routers, Math.floor(Date.now() / 5000)]), rows);
  }

  // A tripped mass-disconnect guard: what it holds (per cause), and Confirm.
  function guardRow(r) {
    const held = Object.entries(r.guard_held || {});
    if (!r.guard_tripped_at && held.length === 0) return null;
    const parts = held.map(([cause, h]) => {
      const changes = (h.changes || []).map((c) =>
        el("li", { class: "code small", text: `subscriber ${c.subscriber_id}: ${
          (c.commands || []).map((x) => [x.action, x.menu, x.id].filter(Boolean).join(" ")).join("; ")}` }));
      const unknown = (h.remove_unknown || []).map((u) =>
        el("li", { class: "code small", text: `remove ${u.menu} ${u.name || u.id}` }));
      const more = (h.subscriber_ids || []).length - (h.changes || []).length;
      if (more > 0) changes.push(el("li", { class: "muted small", text: `… and ${more} more` }));
      return el(
        "div",
        { class: "guard-part", "data-guard-cause": cause },
        el("strong", { text: `guard: ${h.would_disconnect} of ${h.subscribers} would be cut off` }),
        el("span", { class: "muted small", text: ` (${cause}) ${h.reason || ""}` }),
        el("ul", { class: "guard-plan" }, ...changes, ...unknown),
      );
    });
    if (parts.length === 0) parts.push(el("strong", { text: `guard: ${r.guard_reason || "tripped"}` }));
    return el(
      "tr",
      { class: "guard-row", "data-guard": r.id },
      el(
        "td",
        { colSpan: 6 },
        ...parts,
        el("button", { type: "button", class: "danger", text: "Confirm", "data-confirm-guard": r.id }),
      ),
    );
  }

  function signal(w) {
    // The device's link as its router's registration table shows it (null: never seen).
    if (!w) return td("–");
    const parts = [w.signal_dbm === null ? (w.signal || "?") : `${w.signal_dbm} dBm`];
    if (w.tx_ccq !== null) parts.push(`CCQ ${w.tx_ccq}%`);
    if (!w.associated) parts.push(`left ${when(w.last_seen_at)}`);
    const detail = [
      `${w.source} ${w.interface || ""} ${w.mac_address}`,
      `tx ${w.tx_rate || "–"} / rx ${w.rx_rate || "–"}`,
      w.rx_ccq !== null ? `CCQ tx ${w.tx_ccq}% / rx ${w.rx_ccq}%` : null,
      `last activity ${w.last_activity || "–"}, seen ${absolute(w.last_seen_at)}`,
    ].filter(Boolean).join("\n");
    return td(parts.join(" · "), w.associated ? null : "muted", detail);
  }

  // Why a subscriber is not synced: the last error, and for `retrying` which attempt
  // failed and when the next one comes.
  function syncDetail(s) {
    if (s.sync_status === "retrying") {
      const next = s.next_sync_at ? `next try ${when(s.next_sync_at)}` : "next try soon";
      return `attempt ${s.sync_attempt || "?"} failed, ${next}: ${s.sync_error || ""}`;
    }
    return s.sync_status === "synced" ? "" : s.sync_error || "";
  }

  async function subscribers() {
    const { q, status, offset, limit } = state.subs;
    const params = new URLSearchParams({ limit: String(limit), offset: String(offset) });
    if (q) params.set("q", q);
    if (status) params.set("sync_status", status);
    const data = await api("GET", `/api/subscribers?${params}`);
    state.subs.total = data.total;
    $("sub-total").textContent = count(data.total);
    const last = Math.min(offset + data.subscribers.length, data.total);
    $("sub-range").textContent = data.total ? `${offset + 1}–${last} of ${count(data.total)}` : "none";
    $("sub-prev").disabled = offset === 0;
    $("sub-next").disabled = offset + limit >= data.total;
    const rows = data.subscribers.map((s) => {
      const session = s.online === true ? (s.address ? `online ${s.address}` : "online") : s.online === false ? "offline" : "–";
      return el(
        "tr",
        { "data-subscriber": s.id, "data-sync": s.sync_status },
        td(s.id, "num"),
        td(s.username + (s.is_suspended ? ` (suspended${s.suspension_reason ? `: ${s.suspension_reason}` : ""})` : "")),
        td(state.routers.get(s.router_id) || `#${s.router_id}`),
        td(s.service),
        el("td", {}, badge(s.sync_status, s.sync_status)),
        td(syncDetail(s), "wrap"),
        td(session),
        signal(s.wireless),
        td(when(s.expires_at), null, s.expires_at ? absolute(s.expires_at) : null),
        td(when(s.last_synced_at), null, s.last_synced_at ? absolute(s.last_synced_at) : null),
        el("td", {}, el("button", { type: "button", class: "ghost", text: "Retry", "data-retry": s.id })),
      );
    });
    fill("subscribers", JSON.stringify([data, Math.floor(Date.now() / 5000)]), rows);
  }

  async function deadLetters() {
    const data = await api("GET", "/api/dead-letters?limit=50");
    const rows = data.dead_letters.map((d) =>
      el(
        "tr",
        { "data-dead": d.id },
        td(when(d.failed_at), null, d.failed_at ? `${absolute(d.failed_at)} · ${d.id}` : d.id),
        td(d.stream || "–"),
        td(d.type || "–"),
        td(d.error || "–", "wrap reason"),
        td(d.attempt || "1", "num"),
        td(d.payload || "", "code trunc", d.payload || null),
        el(
          "td",
          {},
          el("button", { type: "button", text: "Replay", "data-replay": d.id }),
          el("button", { type: "button", class: "danger", text: "Drop", "data-drop": d.id }),
        ),
      ),
    );
    fill("dead-letters", JSON.stringify([data, Math.floor(Date.now() / 10000)]), rows);
  }

  async function batches() {
    let data;
    try {
      data = await api("GET", "/api/bouncer/batches?limit=50");
    } catch (err) {
      // Older servers have no such endpoint yet: an empty table, not an error.
      if (err.status === 404 || err.status === 405) data = { batches: [] };
      else throw err;
    }
    const rows = (data.batches || []).map((b) => {
      const total = Number(b.total) || 0;
      const done = Number(b.processed) || 0;
      const pct = total ? Math.min(100, Math.round((done * 100) / total)) : 0;
      return el(
        "tr",
        { "data-batch": b.id },
        td(b.id, "code"),
        td(b.check_type),
        el("td", {}, badge(b.status, b.status)),
        el(
          "td",
          { title: `${pct}%` },
          el("span", { class: "progress" }, el("span", { style: `width: ${pct}%` })),
          `${count(done)} / ${count(total)}`,
        ),
        td(when(b.created_at), null, b.created_at ? absolute(b.created_at) : null),
      );
    });
    fill("batches", JSON.stringify([data, Math.floor(Date.now() / 5000)]), rows);
  }

  async function demo() {
    let data;
    try {
      data = await api("GET", "/api/demo");
    } catch (err) {
      if (err.status === 404) data = { enabled: false };
      else throw err;
    }
    $("demo").hidden = !data.enabled;
    if (!data.enabled) return;
    const cards = data.routers.map((r) =>
      el(
        "div",
        { class: "demo-router", "data-demo-router": r.index },
        el("strong", { text: r.name }),
        el("span", { class: "muted small", text: `127.0.0.1:${r.port}` }),
        badge(r.down ? "down" : "up", r.down ? "down" : "up"),
        el("button", {
          type: "button",
          class: r.down ? "" : "danger",
          text: r.down ? "Bring back" : "Take offline",
          "data-outage": r.index,
          "data-down": r.down ? "false" : "true",
        }),
      ),
    );
    if (state.rendered.demoKey !== JSON.stringify(data.routers)) {
      state.rendered.demoKey = JSON.stringify(data.routers);
      $("demo-routers").replaceChildren(...cards);
    }
    $("demo-note").textContent = data.note || "";
  }

  // --- refresh loop --------------------------------------------------------------------

  // A channel out of credit for a tenant: its messages are held until
  // service_control start (GET /api/channels).
  async function credit() {
    const data = await api("GET", "/api/channels");
    const stops = [];
    for (const c of data.channels) {
      for (const t of c.out_of_credit || []) {
        stops.push(`${c.service} out of credit for tenant ${t.tenant_id ?? "(global)"}: ${t.reason}`);
      }
    }
    const node = $("credit-banner");
    node.hidden = stops.length === 0;
    node.textContent = stops.length
      ? `${stops.join(" · ")} — messages are held; top up, then service_control start.`
      : "";
  }

  const SECTIONS = [
    ["credit", credit],
    ["queues", queues],
    ["routers", async () => { await routers(); await subscribers().catch((e) => fail("subscribers", e)); }],
    ["dead", deadLetters],
    ["batches", batches],
    ["demo", demo],
  ];

  function fail(name, err) {
    if (err && err.status === 401) return;
    if (err && err.status === 403) return forbid(name);
    showError(name, err && err.message ? err.message : String(err));
  }

  // A tenant's token (POST /api/tokens) sees its own tenant only: the service-wide
  // sections (streams, dead letters, history, demo) answer 403 and are hidden, not errors.
  function forbid(name) {
    const node = document.querySelector(`[data-error="${name}"]`);
    const card = node && node.closest("section");
    if (!card) return;
    card.hidden = true;
    card.dataset.forbidden = "true";
  }

  async function whoami() {
    try {
      const me = await api("GET", "/api/me");
      $("scope").textContent = me.admin ? "admin" : `tenant ${me.tenant_name ?? me.tenant_id}`;
    } catch (_) {
      $("scope").textContent = "";
    }
  }

  async function refresh() {
    if (state.busy || !state.token) return;
    state.busy = true;
    try {
      await Promise.all([
        health(),
        ...SECTIONS.map(([name, fn]) =>
          fn().then(() => showError(name, ""), (err) => fail(name, err)),
        ),
      ]);
      $("updated").textContent = `updated ${new Date().toLocaleTimeString("en-GB")}`;
      document.body.dataset.loaded = "true";
    } finally {
      state.busy = false;
    }
  }

  function start() {
    $("login").hidden = true;
    $("app").hidden = false;
    $("logout").hidden = false;
    whoami();
    refresh();
    clearInterval(state.timer);
    state.timer = setInterval(refresh, REFRESH_MS);
  }

  function logout(message) {
    for (const node of document.querySelectorAll("[data-forbidden]")) {
      node.hidden = false;
      delete node.dataset.forbidden;
    }
    $("scope").textContent = "";
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    clearInterval(state.timer);
    state.rendered = {};
    state.prev = null;
    $("app").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("token").value = "";
    $("token").focus();
  }

  // --- actions -------------------------------------------------------------------------

  async function act(button, work, done) {
    button.disabled = true;
    try {
      await work();
      toast(done);
      state.rendered = {};
      await refresh();
    } catch (err) {
      toast(err.message || String(err));
    } finally {
      button.disabled = false;
    }
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    const d = button.dataset;
    if (d.replay) {
      act(button, () => api("POST", `/api/dead-letters/${encodeURIComponent(d.replay)}/replay`),
        `Dead letter ${d.replay} replayed`);
    } else if (d.drop) {
      if (!window.confirm(`Drop dead letter ${d.drop}? Its job is lost for good.`)) return;
      act(button, () => api("DELETE", `/api/dead-letters/${encodeURIComponent(d.drop)}`),
        `Dead letter ${d.drop} dropped`);
    } else if (d.retry) {
      act(button, async () => {
        await api("POST", `/api/subscribers/${encodeURIComponent(d.retry)}/sync`);
        // The API marked it pending; show that at once, before the next refresh.
        const row = button.closest("tr");
        const pill = row && row.querySelector(".pill");
        if (pill && row.dataset.sync !== "syncing") {
          pill.textContent = "pending";
          pill.className = "pill state-pending";
          row.dataset.sync = "pending";
        }
      }, `Sync of subscriber ${d.retry} queued`);
    } else if (d.confirmGuard) {
      if (!window.confirm(`Let router ${d.confirmGuard}'s held disconnections go ahead?`)) return;
      act(button, () => api("POST", `/api/routers/${encodeURIComponent(d.confirmGuard)}/guard/confirm`),
        `Guard of router ${d.confirmGuard} confirmed: its held plan is applied`);
    } else if (d.pause) {
      const resume = d.resume === "true";
      act(button, () => api("POST", `/api/queues/${encodeURIComponent(d.pause)}/${resume ? "resume" : "pause"}`),
        resume ? `Stream ${d.pause} resumed` : `Stream ${d.pause} paused: it accepts jobs and runs none`);
    } else if (d.outage !== undefined) {
      const down = d.down === "true";
      act(button, () => api("POST", `/api/demo/routers/${encodeURIComponent(d.outage)}/outage`, { down }),
        down ? "Router taken offline" : "Router back online");
    }
  });

  $("logout").addEventListener("click", () => logout(""));

  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    state.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("login-error").textContent = "";
    start();
  });

  let searchTimer = null;
  $("sub-search").addEventListener("input", (event) => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      state.subs.q = event.target.value.trim();
      state.subs.offset = 0;
      subscribers().then(() => showError("subscribers", ""), (err) => fail("subscribers", err));
    }, 250);
  });
  $("sub-status").addEventListener("change", (event) => {
    state.subs.status = event.target.value;
    state.subs.offset = 0;
    subscribers().then(() => showError("subscribers", ""), (err) => fail("subscribers", err));
  });
  $("sub-prev").addEventListener("click", () => {
    state.subs.offset = Math.max(0, state.subs.offset - state.subs.limit);
    subscribers().catch((err) => fail("subscribers", err));
  });
  $("sub-next").addEventListener("click", () => {
    if (state.subs.offset + state.subs.limit < state.subs.total) state.subs.offset += state.subs.limit;
    subscribers().catch((err) => fail("subscribers", err));
  });

  // --- shared with views.js (ledger, subscriber detail, history, throughput) ------------

  // Its sections join SECTIONS, so they refresh with the rest and share the error lines.
  window.imsys = Object.freeze({
    state, api, el, td, badge, fill, showError, fail, toast, when, absolute, count, duration,
    sections: SECTIONS,
  });

  // --- start ---------------------------------------------------------------------------

  // A link may carry the token in its fragment (#token=...): it never reaches a server
  // log. Keep it for this tab and take it out of the address bar.
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("token")) {
    sessionStorage.setItem(TOKEN_KEY, fragment.get("token"));
    history.replaceState(null, "", location.pathname + location.search);
  }
  state.token = sessionStorage.getItem(TOKEN_KEY);
  health();
  if (state.token) start();
  else logout("");
})();
