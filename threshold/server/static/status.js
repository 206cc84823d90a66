// threshold status page: reads the management API and draws it.
//
// Everything that comes from data is put in the page as text nodes
// (textContent, setAttribute on SVG numbers): never as markup. The page
// polls GET /clients, GET /tunnels/status and GET /status/history; when
// GET /events answers (Server-Sent Events), each event triggers a refresh
// and polling slows down.
"use strict";

(function () {
  const POLL_MS = 2000;
  const POLL_WITH_EVENTS_MS = 10000;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const CHART_W = 300;
  const CHART_H = 80;

  let pollMs = POLL_MS;
  let timer = null;
  let busy = false;

  // -- small DOM helpers: text only ------------------------------------------

  function el(tag, className, ...children) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      node.setAttribute(name, String(value));
    }
    return node;
  }

  function badge(text, kind) {
    return el("span", "badge " + kind, text);
  }

  function facts(pairs) {
    const dl = el("dl");
    for (const [name, value] of pairs) {
      if (value === null || value === undefined) continue;
      dl.append(el("dt", "", name), el("dd", "", value));
    }
    return dl;
  }

  // -- formatting ------------------------------------------------------------

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    let v = n;
    while (v >= 1000 && i < units.length - 1) {
      v /= 1000;
      i += 1;
    }
    return (i === 0 ? String(Math.round(v)) : v.toFixed(v < 10 ? 2 : 1)) + " " + units[i];
  }

  function since(iso) {
    if (!iso) return null;
    const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    let ago;
    if (seconds < 90) ago = Math.round(seconds) + " s";
    else if (seconds < 5400) ago = Math.round(seconds / 60) + " min";
    else if (seconds < 172800) ago = Math.round(seconds / 3600) + " h";
    else ago = Math.round(seconds / 86400) + " days";
    return iso.replace("T", " ") + " (" + ago + ")";
  }

  function last(values) {
    for (let i = values.length - 1; i >= 0; i -= 1) {
      if (values[i] !== null) return values[i];
    }
    return null;
  }

  // -- charts ----------------------------------------------------------------

  // The time a chart spans: from its oldest sample (at least 20 intervals)
  // up to the whole ring's span, so a young server's chart is not a sliver.
  function chartSpan(samples, now, span, interval) {
    const oldest = samples.Times.length ? samples.Times[0] : now;
    return Math.min(span, Math.max(now - oldest, 20 * interval));
  }

  // One small chart: lines over the last `span` seconds, newest at the right.
  function chart(title, samples, now, span, lines) {
    const box = svg("svg", {
      class: "chart",
      viewBox: "0 0 " + CHART_W + " " + CHART_H,
      preserveAspectRatio: "none",
      role: "img",
    });
    const label = svg("title");
    label.textContent = title;
    box.append(label);
    box.append(svg("line", { class: "axis", x1: 0, y1: CHART_H - 1, x2: CHART_W, y2: CHART_H - 1 }));
    let max = 0;
    for (const line of lines) {
      for (const v of samples[line.key] || []) if (v !== null && v > max) max = v;
    }
    const caption = el("figcaption", "", el("span", "", title));
    const minutes = span >= 120 ? Math.round(span / 60) + " min" : Math.round(span) + " s";
    for (const line of lines) {
      const values = samples[line.key] || [];
      const points = [];
      samples.Times.forEach(function (t, i) {
        const v = values[i];
        if (v === null || v === undefined) return;
        const x = CHART_W * (1 - (now - t) / span);
        const y = CHART_H - 2 - (max > 0 ? (CHART_H - 6) * (v / max) : 0);
        points.push(x.toFixed(1) + "," + y.toFixed(1));
      });
      const poly = svg("polyline", { class: line.cls, points: points.join(" ") });
      poly.dataset.points = String(points.length);
      poly.dataset.last = String(last(values) ?? "");
      box.append(poly);
      caption.append(el("span", line.cls, line.name + " " + line.format(last(values))));
    }
    box.dataset.max = String(max);
    caption.append(el("span", "", "peak " + lines[0].format(max) + " · " + minutes));
    return el("figure", "", box, caption);
  }

  function trafficCharts(samples, now, fullSpan, interval) {
    const span = chartSpan(samples, now, fullSpan, interval);
    const perSecond = function (v) { return v === null ? "–" : bytes(v) + "/s"; };
    const count = function (v) { return v === null ? "–" : String(v); };
    return el(
      "div",
      "charts",
      chart("connections", samples, now, span, [
        { key: "OpenConnections", cls: "open", name: "open", format: count },
      ]),
      chart("bandwidth", samples, now, span, [
        { key: "ReceivedBytesPerSecond", cls: "in", name: "in", format: perSecond },
        { key: "SentBytesPerSecond", cls: "out", name: "out", format: perSecond },
      ]),
    );
  }

  // -- sections --------------------------------------------------------------

  function stateBadge(client) {
    if (client.GoingAway) return badge("going away", "warn");
    if (client.CurrentState === "ClientConnected") return badge("connected", "ok");
    if (client.CurrentState === "ClientError") return badge("error", "bad");
    if (client.CurrentState === "ClientClosed") return badge("closed", "bad");
    return badge(client.CurrentState || "unknown", "warn");
  }

  function healthList(health) {
    const names = Object.keys(health || {});
    if (names.length === 0) return "no checks reported";
    const list = el("ul", "plain");
    for (const name of names) {
      const h = health[name];
      list.append(
        el(
          "li",
          "",
          badge(h.Healthy ? "healthy" : "unhealthy", h.Healthy ? "ok" : "bad"),
          " ",
          name,
          h.Detail ? ": " + h.Detail : null,
        ),
      );
    }
    return list;
  }

  function renderClients(clients) {
    const box = document.getElementById("clients");
    const ids = Object.keys(clients);
    document.getElementById("client-count").textContent = "(" + ids.length + ")";
    const cards = ids.map(function (id) {
      const c = clients[id];
      const card = el("article", "card", el("h3", "", id, " ", stateBadge(c)));
      card.dataset.clientId = id;
      card.dataset.state = c.CurrentState || "";
      card.append(
        facts([
          ["RTT", c.RttMilliseconds === null || c.RttMilliseconds === undefined ? null : c.RttMilliseconds.toFixed(1) + " ms"],
          ["gateways", Array.isArray(c.Gateways) ? (c.Gateways.join(", ") || "none") : "this gateway"],
          ["connected since", c.CurrentState === "ClientConnected" ? since(c.ConnectedSince) : null],
          ["last change", c.CurrentState !== "ClientConnected" ? since(c.LastChange) : null],
          ["peer", c.Peer],
          ["streams open", c.OpenStreams === undefined ? null : String(c.OpenStreams)],
          ["sessions", c.Connections === undefined ? null : String(c.Connections)],
          ["last error", c.LastError],
          ["health", healthList(c.Health)],
        ]),
      );
      return card;
    });
    box.replaceChildren(...(cards.length ? cards : [el("p", "empty", "no client has connected yet")]));
  }

  function tunnelKey(t) {
    return JSON.stringify([t.ListenAddress, t.ListenPort, t.ListenHostnameGlob]);
  }

  function refusals(refused) {
    const items = Object.entries(refused || {}).filter(function (e) { return e[1] > 0; });
    if (items.length === 0) return "none";
    return items.map(function (e) { return e[0] + " " + e[1]; }).join(", ");
  }

  function policy(t) {
    const parts = [t.Balance || "failover"];
    parts.push(t.HaProxyProxyProtocol ? "PROXY v" + (t.HaProxyProxyProtocolVersion || 1) : "no PROXY header");
    if (t.AllowSourceCidrs && t.AllowSourceCidrs.length) parts.push("allow " + t.AllowSourceCidrs.join(" "));
    if (t.DenySourceCidrs && t.DenySourceCidrs.length) parts.push("deny " + t.DenySourceCidrs.join(" "));
    if (t.MaxNewConnectionsPerSecondPerSourceIp) parts.push(t.MaxNewConnectionsPerSecondPerSourceIp + " new/s per source");
    if (t.BandwidthBytesPerSecond) parts.push("bandwidth " + bytes(t.BandwidthBytesPerSecond) + "/s");
    return parts.join(" · ");
  }

  function tunnelClients(t) {
    const list = el("ul", "plain");
    for (const c of t.Clients || []) {
      const serving = (t.Serving || []).includes(c.ClientId);
      list.append(
        el(
          "li",
          "",
          badge(serving ? "serving" : c.Healthy ? "standby" : "down", serving ? "ok" : c.Healthy ? "warn" : "bad"),
          " ",
          c.ClientId,
          c.Reason ? ": " + c.Reason : null,
        ),
      );
    }
    return list;
  }

  function renderTunnels(status, history) {
    const box = document.getElementById("tunnels");
    const tunnels = status.Tunnels || [];
    document.getElementById("tunnel-count").textContent = "(" + tunnels.length + ")";
    const byKey = new Map((history.Tunnels || []).map(function (h) { return [tunnelKey(h), h]; }));
    const cards = tunnels.map(function (t) {
      const h = byKey.get(tunnelKey(t));
      const where = t.ListenAddress + ":" + t.ListenPort + (t.ListenHostnameGlob !== "*" ? " " + t.ListenHostnameGlob : "");
      const card = el("article", "card", el("h3", "", where, " → ", t.BackEndService));
      card.dataset.tunnel = where;
      card.dataset.receivedBytes = h ? String(h.ReceivedBytes) : "";
      card.dataset.sentBytes = h ? String(h.SentBytes) : "";
      if (h) {
        const times = h.Samples.Times;
        card.dataset.samples = [times.length, times[0], times[times.length - 1]].join(" ");
      }
      card.append(
        facts([
          ["clients", tunnelClients(t)],
          ["open", h ? String(h.OpenConnections) : "–"],
          ["connections", h ? String(h.Connections) : "–"],
          ["bytes in", h ? bytes(h.ReceivedBytes) : "–"],
          ["bytes out", h ? bytes(h.SentBytes) : "–"],
          ["refused", refusals(t.Policy && t.Policy.Refused)],
          ["policy", policy(t)],
        ]),
      );
      if (h) card.append(trafficCharts(h.Samples, history.Now, history.SpanSeconds, history.IntervalSeconds));
      else card.append(el("p", "muted", "no history for this tunnel (past the sampled tunnels)"));
      return card;
    });
    for (const n of status.NotRestored || []) {
      cards.push(el("article", "card", el("h3", "", "not restored ", badge("error", "bad")), el("p", "", n.Error)));
    }
    box.replaceChildren(...(cards.length ? cards : [el("p", "empty", "no tunnel in force")]));
  }

  function renderGateway(history, clients, status) {
    const g = history.Gateway;
    const connected = Object.values(clients).filter(function (c) { return c.CurrentState === "ClientConnected"; }).length;
    const card = el("article", "card", el("h3", "", "traffic"));
    card.append(
      facts([
        ["clients connected", connected + " of " + Object.keys(clients).length],
        ["tunnels", String((status.Tunnels || []).length)],
        ["open connections", String(g.OpenConnections)],
        ["connections", String(g.Connections)],
        ["bytes in", bytes(g.ReceivedBytes)],
        ["bytes out", bytes(g.SentBytes)],
        ["refused", refusals(g.Refused)],
        ["sampled every", history.IntervalSeconds + " s"],
      ]),
      trafficCharts(g.Samples, history.Now, history.SpanSeconds, history.IntervalSeconds),
    );
    document.getElementById("gateway").replaceChildren(card);
  }

  // -- refreshing --------------------------------------------------------------

  async function getJson(path) {
    const response = await fetch(path, { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) {
      let why = String(response.status);
      try {
        why += " " + (await response.json()).error;
      } catch (e) {
        // not JSON: the status is enough
      }
      throw new Error(path + ": " + why);
    }
    return response.json();
  }

  // The samples the page has: after the first answer it asks only for the
  // samples taken since (?after=), adds them and keeps as many as the
  // server does (SamplesKept), so a poll stays small.
  let history = null;

  function mergeSamples(old, fresh, kept) {
    const out = {};
    for (const name of Object.keys(fresh)) {
      const merged = (old && old[name] ? old[name] : []).concat(fresh[name]);
      out[name] = merged.slice(Math.max(0, merged.length - kept));
    }
    return out;
  }

  async function getHistory() {
    if (history === null) {
      history = await getJson("/status/history");
      return history;
    }
    const fresh = await getJson("/status/history?after=" + history.Sample);
    if (fresh.Epoch !== history.Epoch || fresh.Sample < history.Sample) {
      // The server restarted: what the page has is void.
      history = null;
      return getHistory();
    }
    const before = new Map(history.Tunnels.map(function (t) { return [tunnelKey(t), t]; }));
    fresh.Gateway.Samples = mergeSamples(history.Gateway.Samples, fresh.Gateway.Samples, fresh.Gateway.SamplesKept);
    for (const t of fresh.Tunnels) {
      const old = before.get(tunnelKey(t));
      t.Samples = mergeSamples(old && old.Samples, t.Samples, t.SamplesKept);
    }
    history = fresh;
    return history;
  }

  async function refresh() {
    if (busy) return;
    busy = true;
    const updated = document.getElementById("updated");
    try {
      const [clients, status, history] = await Promise.all([
        getJson("/clients"),
        getJson("/tunnels/status"),
        getHistory(),
      ]);
      renderGateway(history, clients, status);
      renderClients(clients);
      renderTunnels(status, history);
      updated.className = "muted";
      updated.textContent = "updated " + new Date().toLocaleTimeString() + (pollMs === POLL_MS ? "" : " · live");
      document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
    } catch (error) {
      updated.className = "error";
      updated.textContent = "cannot read the API: " + error.message;
    } finally {
      busy = false;
    }
  }

  function schedule() {
    if (timer !== null) clearTimeout(timer);
    timer = setTimeout(function () {
      refresh().finally(schedule);
    }, pollMs);
  }

  // Any event means something changed: refresh soon (at most every 250 ms).
  let soon = null;
  function eventArrived() {
    if (soon !== null) return;
    soon = setTimeout(function () {
      soon = null;
      refresh();
    }, 250);
  }

  // The event types that change what the page shows (docs/events.md);
  // the others are ignored.
  const EVENTS = [
    "client.connected", "client.disconnected", "client.replaced", "client.health",
    "tunnel.failover", "tunnels.applied", "limit.hit",
  ];

  function listen() {
    if (typeof EventSource === "undefined") return;
    // A server without /events answers 404: EventSource then closes for
    // good and the page keeps polling every POLL_MS.
    const source = new EventSource("/events");
    source.onopen = function () {
      pollMs = POLL_WITH_EVENTS_MS;
      document.body.dataset.events = "open";
      schedule();
    };
    source.onmessage = eventArrived;
    for (const name of EVENTS) source.addEventListener(name, eventArrived);
    source.onerror = function () {
      pollMs = POLL_MS;
      document.body.dataset.events = "closed";
      if (source.readyState === EventSource.CLOSED) source.close();
    };
  }

  document.addEventListener("DOMContentLoaded", function () {
    refresh().finally(schedule);
    listen();
  });
})();
