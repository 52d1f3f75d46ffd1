// votebox live results: subscribes to polls/+/config, polls/+/results and polls/+/series over
// MQTT WebSockets (docs/protocol.md, Poll config, Results, Votes per minute) and draws every
// poll, or one with ?poll=ID, with its votes per minute over the last hour.
// Text from the broker is only ever set with textContent: a poll title is not HTML.
"use strict";

(async function main() {
  const params = new URLSearchParams(location.search);
  const config = await fetch("config.json").then((r) => r.json());
  const wsUrl = params.get("ws") || config.ws_url;
  const only = params.get("poll");
  if (only) document.body.classList.add("single");

  const polls = new Map(); // id -> {config, results, series, element}
  const SVG = "http://www.w3.org/2000/svg";
  const container = document.getElementById("polls");
  const empty = document.getElementById("empty");
  const connection = document.getElementById("connection");

  function setConnection(state, text) {
    connection.dataset.state = state;
    connection.textContent = text;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function render(id) {
    const poll = polls.get(id);
    if (!poll.element) {
      poll.element = el("section", "poll");
      poll.element.dataset.poll = id;
      container.appendChild(poll.element);
    }
    const card = poll.element;
    const results = poll.results || {};
    const cfg = poll.config || {};
    const labels = results.labels || cfg.labels || [];
    const state = results.state || cfg.state || "open";
    card.dataset.state = state;
    card.dataset.total = String(results.total || 0);
    card.dataset.version = String(results.version || 0);
    card.replaceChildren();
    card.appendChild(el("h2", "title", results.title || cfg.title || id));
    const meta = el("div", "meta");
    const badge = el("span", "state", state);
    badge.dataset.state = state;
    meta.appendChild(badge);
    meta.appendChild(el("span", "total", `${results.total || 0} votes`));
    if (results.updated_at) {
      const when = new Date(results.updated_at);
      meta.appendChild(el("span", "updated", `updated ${when.toLocaleTimeString()}`));
    }
    card.appendChild(meta);
    if (results.hidden) {
      card.appendChild(el("div", "hidden-note", "Results are hidden until the poll closes."));
      return;
    }
    const counts = results.counts || labels.map(() => 0);
    const percentages = results.percentages || counts.map(() => 0);
    const top = Math.max(1, ...counts);
    labels.forEach((label, i) => {
      const row = el("div", "option");
      row.dataset.option = String(i);
      row.dataset.count = String(counts[i] || 0);
      row.appendChild(el("span", "label", label));
      const track = el("div", "track");
      const bar = el("div", "bar");
      bar.style.width = `${(100 * (counts[i] || 0)) / top}%`;
      track.appendChild(bar);
      row.appendChild(track);
      row.appendChild(el("span", "count", String(counts[i] || 0)));
      row.appendChild(el("span", "pct", `${(percentages[i] || 0).toFixed(1)}%`));
      card.appendChild(row);
    });
    if (results.nps !== undefined && results.nps !== null) {
      card.appendChild(el("div", "figure nps", `NPS ${results.nps}`));
    } else if (results.mean !== undefined && results.mean !== null) {
      card.appendChild(el("div", "figure mean", `mean ${results.mean}`));
    }
    if (poll.series) card.appendChild(chart(poll.series));
  }

  // Votes per minute over the last hour: one bar a minute, the current one last.
  function chart(series) {
    const counts = Array.isArray(series.counts) ? series.counts.map((n) => Number(n) || 0) : [];
    const box = el("figure", "series");
    const top = Math.max(1, ...counts);
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${counts.length * 4} 40`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    const total = counts.reduce((a, b) => a + b, 0);
    svg.setAttribute("aria-label", `${total} votes in the last hour`);
    counts.forEach((n, i) => {
      const bar = document.createElementNS(SVG, "rect");
      const height = (40 * n) / top;
      bar.setAttribute("x", String(i * 4));
      bar.setAttribute("y", String(40 - height));
      bar.setAttribute("width", "3");
      bar.setAttribute("height", String(height));
      bar.dataset.count = String(n);
      svg.appendChild(bar);
    });
    box.appendChild(svg);
    const last = counts.length ? counts[counts.length - 1] : 0;
    box.appendChild(el("figcaption", "series-caption", `votes per minute, last hour · now ${last}/min`));
    return box;
  }

  function forget(id) {
    const poll = polls.get(id);
    if (poll && poll.element) poll.element.remove();
    polls.delete(id);
  }

  const client = mqtt.connect(wsUrl, {
    protocolVersion: 4, // MQTT 3.1.1: both Mosquitto and the embedded amqtt broker speak it
    clientId: `votebox-dashboard-${Math.random().toString(16).slice(2, 10)}`,
    username: config.username || "dashboard",
    password: config.password || undefined,
    reconnectPeriod: 2000,
    connectTimeout: 10000,
    clean: true,
  });
  const filters = only
    ? [`polls/${only}/config`, `polls/${only}/results`, `polls/${only}/series`]
    : ["polls/+/config", "polls/+/results", "polls/+/series"];

  client.on("connect", () => {
    setConnection("connected", "connected");
    client.subscribe(filters, { qos: 1 });
  });
  client.on("reconnect", () => setConnection("reconnecting", "reconnecting…"));
  client.on("offline", () => setConnection("offline", "offline"));
  client.on("close", () => {
    if (connection.dataset.state === "connected") setConnection("offline", "disconnected");
  });
  client.on("error", (err) => setConnection("offline", `error: ${err.message}`));
  client.on("message", (topic, payload) => {
    const parts = topic.split("/");
    if (parts.length !== 3 || parts[0] !== "polls") return;
    const [, id, kind] = parts;
    if (kind !== "config" && kind !== "results" && kind !== "series") return;
    if (only && id !== only) return; // docs/brokers.md: a broker may hand us another topic
    if (payload.length === 0) {
      // A deleted poll's retained topics clear; its series alone says nothing of the poll.
      if (kind === "series") {
        const known = polls.get(id);
        if (known) delete known.series;
        return;
      }
      return forget(id);
    }
    let body;
    try {
      body = JSON.parse(new TextDecoder().decode(payload));
    } catch (e) {
      return;
    }
    const poll = polls.get(id) || {};
    if (kind === "results" && poll.results && body.version < poll.results.version) return;
    poll[kind] = body;
    polls.set(id, poll);
    if (kind === "series" && !poll.config && !poll.results) return; // drawn with its poll
    empty.hidden = true;
    render(id);
  });
})();
