// imsys dashboard, the views over time: processed/s per stream over the last hour (an SVG
// drawn here), the notification ledger, the finished jobs, and one subscriber's invoices,
// payments, messages and audit trail. Loaded after app.js, whose helpers it uses
// (window.imsys); every server value goes into the page as text or an attribute.
"use strict";

(() => {
  const ui = window.imsys;
  if (!ui) return;
  const { state, api, el, td, badge, fill, showError, fail, when, absolute, count } = ui;
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const STREAMS = ["sync", "billing", "events", "bouncer"];

  const view = {
    ledger: { status: "", channel: "" },
    history: { stream: "", outcome: "" },
    detail: null, // the subscriber id shown, or null
  };

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(key, String(value));
    }
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const stamp = (value) => td(when(value), null, value ? absolute(value) : null);
  const money = (value) => (value === null || value === undefined ? "–" : String(value));

  // --- processed/s over the last hour ---------------------------------------------------

  // A round top for the y axis: 1, 2 or 5 times a power of ten, at least 1 job/s.
  function niceMax(value) {
    if (!(value > 1)) return 1;
    const power = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
    return 10 * power;
  }

  const rate = (n) => (n >= 10 ? n.toFixed(0) : n >= 1 ? n.toFixed(1) : n.toFixed(2));

  function chart(data) {
    const W = 720, H = 170, left = 44, right = 10, top = 10, bottom = 22;
    const series = data.streams.filter((s) => s.per_s.length > 0);
    const n = Math.max(...series.map((s) => s.per_s.length), 2);
    const peak = Math.max(0, ...series.flatMap((s) => s.per_s));
    const ymax = niceMax(peak);
    const x = (i) => left + (i * (W - left - right)) / (n - 1);
    const y = (v) => top + (H - top - bottom) * (1 - Math.min(v, ymax) / ymax);
    const base = y(0);
    const grid = [0, ymax / 2, ymax].flatMap((v) => [
      svg("line", { x1: left, x2: W - right, y1: y(v), y2: y(v), class: "grid" }),
      svg("text", { x: left - 6, y: y(v) + 4, class: "axis", "text-anchor": "end" }, rate(v)),
    ]);
    const minutes = Math.round((n * data.step_s) / 60);
    const ticks = [
      [0, `−${minutes} min`, "start"],
      [Math.floor((n - 1) / 2), `−${Math.round(minutes / 2)} min`, "middle"],
      [n - 1, "now", "end"],
    ].map(([i, label, anchor]) =>
      svg("text", { x: x(i), y: H - 6, class: "axis", "text-anchor": anchor }, label));
    const paths = series.map((s) => {
      const d = s.per_s
        .map((v, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`)
        .join(" ");
      const top = Math.max(0, ...s.per_s);
      return svg(
        "path",
        { d, class: `series series-${s.stream}`, "data-stream": s.stream, "data-peak": top },
        svg("title", {}, `${s.stream}: peak ${rate(top)}/s`),
      );
    });
    const root = svg(
      "svg",
      {
        viewBox: `0 0 ${W} ${H}`,
        class: "throughput",
        role: "img",
        "aria-label": "jobs processed per second, each stream, last hour",
        "data-baseline": base.toFixed(1),
        "data-ymax": ymax,
      },
      ...grid,
      ...ticks,
      ...paths,
    );
    $("throughput-chart").replaceChildren(root);
    $("throughput-legend").replaceChildren(
      ...series.map((s) => {
        const now = s.per_s[s.per_s.length - 1] || 0;
        const jobs = s.counts.reduce((a, b) => a + b, 0);
        return el(
          "span",
          { class: "legend-item", "data-legend": s.stream },
          el("span", { class: `swatch swatch-${s.stream}` }),
          `${s.stream} ${rate(now)}/s now · ${count(jobs)} jobs in the hour`,
        );
      }),
    );
  }

  async function throughput() {
    const data = await api("GET", "/api/throughput?minutes=60");
    const order = (s) => (STREAMS.includes(s.stream) ? STREAMS.indexOf(s.stream) : 99);
    data.streams.sort((a, b) => order(a) - order(b));
    const key = JSON.stringify(data.streams);
    if (state.rendered.throughput === key) return;
    state.rendered.throughput = key;
    chart(data);
  }

  // --- the notification ledger ------------------------------------------------------------

  function note(n) {
    const parts = [];
    if (n.fallback_id) parts.push(`SMS fallback #${n.fallback_id}`);
    if (n.fallback_of) parts.push(`fallback of #${n.fallback_of}`);
    if (n.sent_as && n.sent_as !== "text") parts.push(`template ${n.sent_as}`);
    if (n.error) parts.push(n.error);
    return parts.join(" · ");
  }

  const statusCell = (n) =>
    el("td", { title: n.status_at ? `since ${absolute(n.status_at)}` : null },
      badge(n.status, n.status));

  async function ledger() {
    const data = await api("GET", "/api/notifications");
    const all = data.notifications || [];
    const tally = {};
    for (const n of all) tally[n.status] = (tally[n.status] || 0) + 1;
    $("ledger-summary").textContent = Object.entries(tally)
      .map(([status, k]) => `${status} ${k}`)
      .join(" · ");
    const { status, channel } = view.ledger;
    const shown = all.filter(
      (n) => (!status || n.status === status) && (!channel || n.channel === channel));
    const rows = shown.map((n) =>
      el(
        "tr",
        { "data-notification": n.id, "data-status": n.status },
        td(n.id, "num"),
        stamp(n.created_at),
        td(n.subscriber_id ?? "–", "num"),
        td(n.channel),
        td(n.recipient, "code"),
        td(n.template),
        statusCell(n),
        td(n.provider || "–"),
        td(n.status_code || "–", "code"),
        td(n.provider_message_id || "–", "code trunc", n.provider_message_id || null),
        td(n.attempts, "num"),
        td(note(n), "wrap"),
      ));
    fill("ledger", JSON.stringify([shown, status, channel, Math.floor(Date.now() / 10000)]), rows);
  }

  // --- finished jobs ------------------------------------------------------------------------

  async function history() {
    const params = new URLSearchParams({ limit: "50" });
    if (view.history.stream) params.set("stream", view.history.stream);
    if (view.history.outcome) params.set("outcome", view.history.outcome);
    const data = await api("GET", `/api/history?${params}`);
    const kind = { done: "completed", retried: "retrying", deferred: "pending", dead: "failed" };
    const rows = data.history.map((h) =>
      el(
        "tr",
        { "data-history": h.id, "data-outcome": h.outcome },
        td(when(h.at_ms), null, `${absolute(h.at_ms)} · ${h.id}`),
        td(h.stream),
        td(h.type),
        td(h.job_id || "–", "code trunc", h.job_id || null),
        el("td", {}, badge(h.outcome, kind[h.outcome] || h.outcome)),
        td(h.duration_ms === null ? "–" : `${Math.round(h.duration_ms)} ms`, "num"),
      ));
    fill("history", JSON.stringify([data, Math.floor(Date.now() / 5000)]), rows);
  }

  // --- one subscriber -------------------------------------------------------------------------

  function facts(s) {
    const pairs = [
      ["sync", badge(s.sync_status, s.sync_status)],
      ["service", s.service],
      ["router", state.routers.get(s.router_id) || `#${s.router_id}`],
      ["package", `#${s.package_id}`],
      ["expires", `${when(s.expires_at)}${s.expires_at ? ` (${absolute(s.expires_at)})` : ""}`],
      ["suspended", s.is_suspended ? `yes${s.suspension_reason ? `: ${s.suspension_reason}` : ""}` : "no"],
      ["session", s.online === true ? `online ${s.address || ""}` : s.online === false ? "offline" : "–"],
      ["phone", s.phone || "–"],
      ["e-mail", s.email || "–"],
      ["tenant", `#${s.tenant_id}`],
    ];
    if (s.sync_error) pairs.push(["sync error", s.sync_error]);
    return pairs.flatMap(([k, v]) => [
      el("dt", { text: k }),
      el("dd", { "data-fact": k }, v instanceof Node ? v : String(v)),
    ]);
  }

  function outcomeKind(outcome) {
    if (outcome === "ok") return "completed";
    if (outcome.startsWith("failed")) return "failed";
    return "pending"; // unknown outcome: in flight, or the process died there
  }

  function auditRows(audit) {
    return audit.map((a) => {
      const detail = a.detail && Object.keys(a.detail).length ? JSON.stringify(a.detail) : "";
      return el(
        "tr",
        { "data-audit": a.id, "data-cause": a.cause },
        td(when(a.at), null, absolute(a.at)),
        el("td", {}, a.cause, el("div", { class: "muted small code", text: a.correlation_id })),
        el("td", {}, el("span", { class: "code", text: a.action }),
          detail ? el("div", { class: "muted small code wrap-code", text: detail }) : null),
        el("td", { class: "wrap", title: a.completed_at ? `completed ${absolute(a.completed_at)}` : null },
          badge(a.outcome, outcomeKind(a.outcome))),
        td(a.router || (a.router_id ? `#${a.router_id}` : "–")),
      );
    });
  }

  async function detail() {
    const id = view.detail;
    if (id === null) return;
    const base = `/api/subscribers/${encodeURIComponent(id)}`;
    const [s, inv, pay, notes, audit] = await Promise.all([
      api("GET", base),
      api("GET", `${base}/invoices`),
      api("GET", `${base}/payments`),
      api("GET", `/api/notifications?subscriber_id=${encodeURIComponent(id)}`),
      api("GET", `${base}/audit`),
    ]);
    if (view.detail !== id) return; // another subscriber was opened meanwhile
    $("detail-title").textContent = `Subscriber ${s.username} (#${s.id})`;
    const key = JSON.stringify([s, Math.floor(Date.now() / 5000)]);
    if (state.rendered.detailFacts !== key) {
      state.rendered.detailFacts = key;
      $("detail-facts").replaceChildren(...facts(s));
    }
    fill("detail-invoices", JSON.stringify(inv), inv.invoices.map((i) =>
      el(
        "tr",
        { "data-invoice": i.id, "data-status": i.status },
        td(i.period),
        td(i.package || `#${i.package_id}`),
        td(money(i.amount), "num"),
        el("td", {}, badge(i.status, i.status === "paid" ? "completed" : i.status === "open" ? "pending" : "void")),
        stamp(i.due_at),
        stamp(i.created_at),
      )));
    fill("detail-payments", JSON.stringify(pay), pay.payments.map((p) =>
      el(
        "tr",
        { "data-payment": p.id },
        td(p.reference, "code"),
        td(money(p.amount), "num"),
        stamp(p.created_at),
        p.applied_at ? stamp(p.applied_at) : el("td", {}, badge("not yet", "pending")),
      )));
    fill("detail-notifications", JSON.stringify(notes), (notes.notifications || []).map((n) =>
      el(
        "tr",
        { "data-notification": n.id, "data-status": n.status },
        stamp(n.created_at),
        td(n.channel),
        td(n.template),
        statusCell(n),
        td(n.provider || "–"),
        td(n.status_code || "–", "code"),
        td(note(n), "wrap"),
      )));
    fill("detail-audit", JSON.stringify(audit), auditRows(audit.audit));
  }

  function open(id) {
    view.detail = id;
    for (const t of ["detail-invoices", "detail-payments", "detail-notifications", "detail-audit"]) {
      delete state.rendered[t];
      $(t).tBodies[0].replaceChildren();
    }
    delete state.rendered.detailFacts;
    $("detail-facts").replaceChildren();
    $("detail-title").textContent = `Subscriber #${id}`;
    $("subscriber-detail").hidden = false;
    $("subscriber-detail").dataset.subscriber = id;
    showError("detail", "");
    detail().then(
      () => $("subscriber-detail").scrollIntoView({ block: "start" }),
      (err) => fail("detail", err),
    );
  }

  function close() {
    view.detail = null;
    $("subscriber-detail").hidden = true;
    delete $("subscriber-detail").dataset.subscriber;
  }

  // --- wiring ---------------------------------------------------------------------------------

  ui.sections.push(
    ["throughput", throughput],
    ["ledger", ledger],
    ["history", history],
    ["detail", detail],
  );

  // A click on a subscriber's row (not on its buttons) opens its detail.
  $("subscribers").addEventListener("click", (event) => {
    if (event.target.closest("button")) return;
    const row = event.target.closest("tr[data-subscriber]");
    if (row) open(row.dataset.subscriber);
  });
  $("detail-close").addEventListener("click", close);

  const reload = (name, fn) => fn().then(() => showError(name, ""), (err) => fail(name, err));
  $("ledger-status").addEventListener("change", (event) => {
    view.ledger.status = event.target.value;
    reload("ledger", ledger);
  });
  $("ledger-channel").addEventListener("change", (event) => {
    view.ledger.channel = event.target.value;
    reload("ledger", ledger);
  });
  $("history-stream").addEventListener("change", (event) => {
    view.history.stream = event.target.value;
    reload("history", history);
  });
  $("history-outcome").addEventListener("change", (event) => {
    view.history.outcome = event.target.value;
    reload("history", history);
  });

  // app.js started its first refresh before these sections joined: show them now.
  if (state.token) {
    for (const [name, fn] of [["throughput", throughput], ["ledger", ledger], ["history", history]]) {
      reload(name, fn);
    }
  }
})();
