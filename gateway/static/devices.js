// The devices and health page: every driver and device of the site, the
// gateway's own health, and (for technicians) a test per dome light and
// pager. Read again every few seconds; a test is answered at once.
"use strict";

const {el} = gw;
const message = document.getElementById("message");
const REFRESH_MS = 5000;
let me = null;
let site = {zones: {}, rooms: {}, staff: {}};

function say(text, ok) {
  message.textContent = text;
  message.className = ok ? "ok" : "bad";
}

function ago(now, ts) {
  return ts ? `${gw.age(now - ts)} ago` : "never";
}

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

async function test(path, done) {
  try {
    await gw.api("POST", path);
    say(done, true);
  } catch (error) {
    if (error.status !== 401) say(error.message, false);
  }
}

function fact(name, value, bad) {
  return el("tr", {class: bad ? "bad" : null, dataset: {fact: name}},
    el("th", {}, name), el("td", {}, value));
}

function renderHealth(h) {
  const b = h.broker, u = h.upstream, d = h.disk, c = h.clock;
  const clockText = c.synchronised === null ? `cannot tell (${c.method})`
    : `${c.synchronised ? "synchronised" : "NOT synchronised"} (${c.method})`;
  const lag = h.loop_lag_seconds === null ? "not measured yet" : `${(h.loop_lag_seconds * 1000).toFixed(1)} ms`;
  document.querySelector("#health tbody").replaceChildren(
    fact("Broker link", `${b.connected ? "connected" : "DOWN"} since ${gw.time(b.since) || "start"}`
      + ` (${b.connects} connection${b.connects === 1 ? "" : "s"})`, !b.connected),
    fact("Outbox", `${u.depth} waiting` + (u.oldest_undelivered_age ? `, oldest ${gw.age(u.oldest_undelivered_age)} old` : "")
      + (u.upstream ? ` to ${u.upstream}` : ", no upstream set"), u.consecutive_failures > 0),
    fact("Last delivery", u.last_success_at ? gw.time(u.last_success_at) : "none yet"),
    fact("Last upstream error", u.last_error ? `${u.last_error} at ${gw.time(u.last_error_at)}` : "none", !!u.last_error),
    fact("Disk", `${bytes(d.free_bytes)} free of ${bytes(d.total_bytes)}; database ${bytes(d.database_bytes)}`, d.low),
    fact("Clock", `${new Date(c.time * 1000).toLocaleString()}, ${clockText}`, c.synchronised === false),
    fact("Loop lag", lag, h.loop_lag_seconds !== null && h.loop_lag_seconds > 0.5),
    fact("Uptime", gw.age(h.uptime_seconds)),
  );
}

function renderDrivers(now, drivers) {
  document.getElementById("no-drivers").hidden = drivers.length > 0;
  document.getElementById("drivers").hidden = drivers.length === 0;
  document.querySelector("#drivers tbody").replaceChildren(...drivers.map(d =>
    el("tr", {dataset: {driver: d.name, state: d.state}},
      el("td", {}, d.name), el("td", {class: `state ${d.state}`}, d.state),
      el("td", {}, d.reason || ""), el("td", {}, d.retry_at ? gw.time(d.retry_at) : ""))));
}

function errors(d) {
  const parts = Object.entries(d.refused).map(([why, n]) => `${n} refused (${why})`);
  const counts = d.driver_counts || {};
  if (counts.bounces) parts.push(`${counts.bounces} bounces`);
  return parts.join(", ");
}

function alertLinks(d) {
  return el("span", {}, ...d.alerts.map(a =>
    el("a", {href: `/alerts#${encodeURIComponent(a.id)}`, class: "alert-link", dataset: {alert: a.id}},
      `${gw.title(a.rule)} ${a.state} ${gw.time(a.opened_at)}`)));
}

function testButton(d) {
  if (!me || me.role !== "technician" || !d.test) return null;
  const id = encodeURIComponent(d.id);
  return el("button", {class: "quiet test",
    onclick: () => test(`/api/devices/${id}/test`, `Dome light of ${d.id} on for a few seconds.`)},
  "Test light");
}

function renderDevices(now, list) {
  document.querySelector("#devices tbody").replaceChildren(...list.map(d =>
    el("tr", {dataset: {device: d.id, state: d.state}},
      el("td", {}, d.id), el("td", {}, d.kind),
      el("td", {}, site.rooms[d.room] || d.room || site.zones[d.zone] || ""),
      el("td", {}, d.driver),
      el("td", {class: `state ${d.state.replace(" ", "-")}`, title: d.reason || ""},
        d.state + (d.reason && d.state === "offline" ? ` - ${d.reason}` : "")),
      el("td", {}, ago(now, d.last_seen)),
      el("td", {}, d.battery === null ? "" : `${d.battery}%`),
      el("td", {class: "errors"}, errors(d)),
      el("td", {}, alertLinks(d)),
      el("td", {class: "actions"}, testButton(d)))));
}

function renderPagers(pagers) {
  document.querySelector("#pagers tbody").replaceChildren(...pagers.map(p =>
    el("tr", {dataset: {staff: p.staff}},
      el("td", {}, p.name), el("td", {}, p.roles.join(", ")),
      el("td", {class: "actions"}, me && me.role === "technician"
        ? el("button", {class: "quiet test",
          onclick: () => test(`/api/staff/${encodeURIComponent(p.staff)}/test-page`,
            `Test page sent to ${p.name}.`)}, "Send test page")
        : null))));
}

function renderBadges(now, badges) {
  document.getElementById("badges-section").hidden = badges.length === 0;
  document.querySelector("#badges tbody").replaceChildren(...badges.map(b =>
    el("tr", {}, el("td", {}, b.badge), el("td", {}, site.staff[b.staff] || b.staff || ""),
      el("td", {}, b.battery_mv === null ? "not measured" : `${b.battery_mv} mV`),
      el("td", {}, ago(now, b.heard_at)))));
}

async function load() {
  try {
    const body = await gw.api("GET", "/api/devices");
    site = body.site;
    document.getElementById("site").textContent = `${site.name} - devices`;
    renderHealth(body.health);
    renderDrivers(body.now, body.drivers);
    renderDevices(body.now, body.devices);
    renderPagers(body.pagers);
    renderBadges(body.now, body.badges);
    document.body.dataset.loaded = String(body.now);
  } catch (error) {
    if (error.status !== 401) say(error.message, false);
  }
}

document.getElementById("signout").addEventListener("click", async () => {
  try { await gw.api("POST", "/api/signout"); } finally { location.href = "/signin"; }
});

async function start() {
  me = await gw.api("GET", "/api/session");
  gw.setCsrf(me.csrf);
  document.getElementById("me").textContent = `${me.name} (${me.role})`;
  document.getElementById("accounts-link").hidden = me.role !== "technician";
  await load();
  setInterval(load, REFRESH_MS);
}

start().catch(error => say(error.message, false));
