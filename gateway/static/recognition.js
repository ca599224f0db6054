// The recognition board: gaps closed, median response and kudos per team
// and per person, today and this week. People who opted out are not named
// (the gateway leaves them out); their closures count in their team's totals.
// Read again every minute: the figures move slowly.
"use strict";

const {el} = gw;
const REFRESH_MS = 60000;
let site = {zones: {}, staff: {}};

function median(seconds) {
  return seconds === null || seconds === undefined ? "-" : gw.age(seconds);
}

function renderPeriod(node, period) {
  node.querySelector(".teams tbody").replaceChildren(...period.teams.map(t =>
    el("tr", {dataset: {team: t.team}},
      el("td", {}, site.zones[t.team] || t.team), el("td", {class: "closed"}, String(t.gaps_closed)),
      el("td", {}, median(t.median_response_seconds)), el("td", {}, String(t.kudos)),
      el("td", {}, t.fastest ? site.staff[t.fastest.staff] || t.fastest.staff : "-"))));
  const active = period.people.filter(p => p.gaps_closed || p.acknowledged || p.kudos);
  node.querySelector(".people tbody").replaceChildren(...active.map(p =>
    el("tr", {dataset: {staff: p.staff}},
      el("td", {}, p.name), el("td", {class: "closed"}, String(p.gaps_closed)),
      el("td", {}, median(p.median_response_seconds)), el("td", {}, String(p.kudos)))));
  node.querySelector(".opted").textContent = period.opted_out
    ? `${period.opted_out} ${period.opted_out === 1 ? "person has" : "people have"} opted out of being named; `
      + "their closures count in their team's totals."
    : "";
}

async function load() {
  try {
    const body = await gw.api("GET", "/api/recognition/board");
    site = body.site;
    document.getElementById("title").textContent = `${site.name} - gaps closed`;
    renderPeriod(document.getElementById("today"), body.today);
    renderPeriod(document.getElementById("week"), body.week);
    document.getElementById("updated").textContent =
      `Updated ${gw.time(body.generated_at)}`;
    document.body.dataset.loaded = String(body.generated_at);
  } catch (error) {
    if (error.status !== 401) {
      const message = document.getElementById("message");
      message.textContent = error.message;
      message.className = "bad";
    }
  }
}

document.getElementById("signout").addEventListener("click", async () => {
  try { await gw.api("POST", "/api/signout"); } finally { location.href = "/signin"; }
});

async function start() {
  const me = await gw.api("GET", "/api/session");
  gw.setCsrf(me.csrf);
  // A wall display shows the board alone, large; people signed in get the bar.
  document.getElementById("nav").hidden = me.role === "display";
  document.body.classList.toggle("wall", me.role === "display");
  document.getElementById("me").textContent = `${me.name} (${me.role})`;
  await load();
  setInterval(load, REFRESH_MS);
}

start().catch(error => { document.getElementById("message").textContent = error.message; });
