// The alerts console for technicians and supervisors: open alerts live,
// acknowledge and resolve, each alert's timeline, silences, recent alerts.
"use strict";

const {el} = gw;
const message = document.getElementById("message");
let site = {zones: {}, rooms: {}, staff: {}};
let alerts = new Map();
let offset = 0;
let shown = null;

const now = () => Date.now() / 1000 + offset;
const staffName = id => (id ? site.staff[id] || id : "");

function say(text, ok) {
  message.textContent = text;
  message.className = ok ? "ok" : "bad";
}

async function act(method, path, body, done) {
  try {
    await gw.api(method, path, body);
    say(done, true);
  } catch (error) {
    if (error.status !== 401) say(error.message, false);
  }
  refresh();
}

function openRow(a) {
  const id = encodeURIComponent(a.id);
  return el("tr", {dataset: {alert: a.id}, class: a.id === shown ? "selected" : null},
    el("td", {}, el("a", {href: "#", onclick: e => { e.preventDefault(); timeline(a.id); }},
      gw.place(site, a))),
    el("td", {}, gw.title(a.rule) + (a.priority !== "routine" ? ` (${a.priority})` : "")),
    el("td", {class: "state"}, a.state + (a.acked_by ? ` by ${staffName(a.acked_by)}` : "")),
    el("td", {}, String(a.level)),
    el("td", {class: "age", dataset: {opened: a.opened_at}}, gw.age(now() - a.opened_at)),
    el("td", {class: "actions"},
      el("button", {class: "ack", disabled: a.state === "acknowledged",
        onclick: () => act("POST", `/api/alerts/${id}/ack`, undefined, "Acknowledged.")}, "Acknowledge"),
      el("button", {class: "resolve quiet",
        onclick: () => act("POST", `/api/alerts/${id}/resolve`, undefined, "Resolved.")}, "Resolve")));
}

function renderOpen() {
  const list = [...alerts.values()].sort((x, y) => y.opened_at - x.opened_at);
  document.querySelector("#open tbody").replaceChildren(...list.map(openRow));
  document.getElementById("none-open").hidden = list.length > 0;
}

async function timeline(alertId) {
  shown = alertId;
  const a = await gw.api("GET", `/api/alerts/${encodeURIComponent(alertId)}`);
  document.getElementById("timeline").hidden = false;
  document.getElementById("timeline-title").textContent =
    `${gw.place(site, a)} - ${gw.title(a.rule)} (${a.state})`;
  document.querySelector("#timeline tbody").replaceChildren(...a.history.map(h =>
    el("tr", {}, el("td", {}, gw.time(h.at)), el("td", {}, h.kind), el("td", {}, h.state),
      el("td", {}, String(h.level)), el("td", {}, staffName(h.actor)), el("td", {}, h.via || ""))));
  renderOpen();
}

async function refresh() {
  try {
    const [recent, silences] = await Promise.all([
      gw.api("GET", "/api/alerts/recent?limit=30"), gw.api("GET", "/api/silences")]);
    document.querySelector("#recent tbody").replaceChildren(...recent.map(a =>
      el("tr", {}, el("td", {}, gw.place(site, a)), el("td", {}, gw.title(a.rule)),
        el("td", {}, a.state), el("td", {}, gw.time(a.opened_at)), el("td", {}, gw.time(a.resolved_at)),
        el("td", {}, staffName(a.resolved_by || a.acked_by)))));
    document.querySelector("#silences tbody").replaceChildren(...silences.map(s =>
      el("tr", {dataset: {silence: s.id}},
        el("td", {}, s.zone ? site.zones[s.zone] || s.zone : s.device), el("td", {}, gw.time(s.until)),
        el("td", {}, s.reason), el("td", {}, staffName(s.by)),
        el("td", {class: "actions"}, el("button", {class: "quiet",
          onclick: () => act("DELETE", `/api/silences/${encodeURIComponent(s.id)}`, undefined, "Silence ended.")},
          "End")))));
    if (shown) await timeline(shown);
  } catch (error) {
    if (error.status !== 401) say(error.message, false);
  }
}

document.getElementById("silence-form").addEventListener("submit", event => {
  event.preventDefault();
  const f = Object.fromEntries(new FormData(event.target));
  const body = {minutes: Number(f.minutes), reason: f.reason};
  if (f.device) body.device = f.device; else body.zone = f.zone;
  act("POST", "/api/silences", body, "Pages held.");
});

document.getElementById("signout").addEventListener("click", async () => {
  try { await gw.api("POST", "/api/signout"); } finally { location.href = "/signin"; }
});

async function start() {
  const me = await gw.api("GET", "/api/session");
  gw.setCsrf(me.csrf);
  document.getElementById("me").textContent =
    `${me.name} (${me.role}${me.staff ? ", " + me.staff : ""})`;
  document.getElementById("accounts-link").hidden = me.role !== "technician";
  document.getElementById("rules-link").hidden = me.role !== "technician";
  gw.live("/api/stream", {
    check: "/api/session",
    state(connected, why) {
      const link = document.getElementById("link");
      link.textContent = connected ? "live" : `not connected - ${why}`;
      link.className = connected ? "link" : "link down";
    },
    snapshot(body) {
      offset = body.now - Date.now() / 1000;
      site = body.site;
      document.getElementById("site").textContent = site.name;
      document.getElementById("silence-zone").replaceChildren(
        ...Object.entries(site.zones).map(([id, name]) => el("option", {value: id}, name)));
      alerts = new Map(body.alerts.map(a => [a.id, a]));
      // /alerts#<id> (a link from the devices page) opens that alert's timeline.
      if (!shown && location.hash.length > 1) shown = decodeURIComponent(location.hash.slice(1));
      renderOpen();
      refresh();
    },
    events: {
      alert(a) {
        if (a.state === "resolved") alerts.delete(a.id); else alerts.set(a.id, a);
        renderOpen();
        refresh();
      },
      tick(body) { offset = body.now - Date.now() / 1000; },
    },
  });
}

setInterval(() => {
  for (const node of document.querySelectorAll("#open .age")) {
    node.textContent = gw.age(now() - Number(node.dataset.opened));
  }
}, 1000);
start().catch(error => say(error.message, false));
