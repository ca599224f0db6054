// The wall display: unresolved gaps by zone, newest first, live over
// Server-Sent Events. Ages tick every second on the gateway's clock (the
// offset to it comes with every snapshot and tick), not the TV's own.
"use strict";

const floor = document.getElementById("floor");
const empty = document.getElementById("empty");
const link = document.getElementById("link");
const clock = document.getElementById("clock");
let site = {zones: {}, rooms: {}, staff: {}};
let alerts = new Map();
let offset = 0;

const now = () => Date.now() / 1000 + offset;

function card(a) {
  const classes = `gap level${a.level} ${a.state} ${a.priority}`;
  const extra = a.priority !== "routine" ? ` - ${a.priority.toUpperCase()}` : "";
  const who = a.acked_by ? ` - ${site.staff[a.acked_by] || a.acked_by} on the way` : "";
  const held = a.held ? " - pages held" : "";
  return gw.el("section", {class: classes, dataset: {alert: a.id, state: a.state}},
    gw.el("div", {class: "top"},
      gw.el("div", {class: "place"}, gw.place(site, a)),
      gw.el("div", {class: "age", dataset: {opened: a.opened_at}}, gw.age(now() - a.opened_at))),
    gw.el("div", {class: "what"}, gw.title(a.rule) + extra),
    gw.el("div", {class: "meta"},
      gw.el("span", {class: "state"}, a.state), ` - level ${a.level}${who}${held}`));
}

function render() {
  const byZone = new Map();
  for (const a of [...alerts.values()].sort((x, y) => y.opened_at - x.opened_at)) {
    const zone = a.zone || "";
    if (!byZone.has(zone)) byZone.set(zone, []);
    byZone.get(zone).push(a);
  }
  const parts = [];
  for (const [zone, list] of byZone) {
    parts.push(gw.el("h2", {}, site.zones[zone] || zone || "Elsewhere"));
    parts.push(gw.el("div", {class: "zone", dataset: {zone}}, ...list.map(card)));
  }
  floor.replaceChildren(...parts);
  empty.hidden = alerts.size > 0;
}

function tick() {
  for (const node of floor.querySelectorAll(".age")) {
    node.textContent = gw.age(now() - Number(node.dataset.opened));
  }
  clock.textContent = new Date(now() * 1000).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
}

function setState(connected, why) {
  link.textContent = connected ? "live" : `NOT CONNECTED - ${why}; reconnecting`;
  link.className = connected ? "link" : "link down";
  document.body.classList.toggle("offline", !connected);
}

gw.live("/api/stream", {
  check: "/api/session",
  state: setState,
  snapshot(body) {
    offset = body.now - Date.now() / 1000;
    site = body.site;
    document.getElementById("title").textContent = `${site.name} - open gaps`;
    alerts = new Map(body.alerts.map(a => [a.id, a]));
    render();
  },
  events: {
    alert(a) {
      if (a.state === "resolved") alerts.delete(a.id);
      else alerts.set(a.id, a);
      render();
    },
    tick(body) { offset = body.now - Date.now() / 1000; },
  },
});
setInterval(tick, 1000);
tick();
