// The staff pager page: the notifications a hardware pager on this person's
// topics would get, live; one tap to acknowledge or resolve. Cards are the
// unresolved alerts this person was paged about; the list survives a reload
// (sessionStorage) and a reconnect (the snapshot brings every open alert).
"use strict";

const cards = document.getElementById("cards");
const nothing = document.getElementById("nothing");
const message = document.getElementById("message");
const offline = document.getElementById("offline");
const soundButton = document.getElementById("sound");
let site = {zones: {}, rooms: {}, staff: {}};
let alerts = new Map();
let texts = new Map(JSON.parse(sessionStorage.getItem("pager-texts") || "[]"));
let offset = 0;
let audio = null;

const ALERTING = new Set(["opened", "escalated", "reminded", "reopened", "released"]);
const now = () => Date.now() / 1000 + offset;

function remember() {
  sessionStorage.setItem("pager-texts", JSON.stringify([...texts]));
}

// Browsers allow sound only after a tap on the page: this button is that tap.
soundButton.addEventListener("click", () => {
  audio = audio || new AudioContext();
  audio.resume();
  soundButton.textContent = "Sound is on";
  soundButton.disabled = true;
  beep();
});

function beep() {
  if (navigator.vibrate) navigator.vibrate([300, 120, 300]);
  if (!audio || audio.state !== "running") return;
  const tone = audio.createOscillator();
  const gain = audio.createGain();
  tone.frequency.value = 880;
  gain.gain.value = 0.3;
  tone.connect(gain).connect(audio.destination);
  tone.start();
  tone.stop(audio.currentTime + 0.35);
}

async function act(alertId, action, button) {
  button.disabled = true;
  message.textContent = "";
  try {
    await gw.api("POST", `/api/pager/alerts/${encodeURIComponent(alertId)}/${action}`);
  } catch (error) {
    message.textContent = error.message;
    button.disabled = false;
  }
}

function card(a) {
  const mine = a.acked_by && a.acked_by === gw.me;
  const taken = a.acked_by ? `taken by ${site.staff[a.acked_by] || a.acked_by}` : "waiting";
  const ack = gw.el("button", {class: "ack", disabled: Boolean(a.acked_by) && mine},
    mine ? "On my way" : "I'm going");
  const done = gw.el("button", {class: "done"}, "Done");
  ack.addEventListener("click", () => act(a.id, "ack", ack));
  done.addEventListener("click", () => act(a.id, "resolve", done));
  const extra = a.priority !== "routine" ? ` ${a.priority.toUpperCase()}` : "";
  return gw.el("section", {class: `card level${a.level} ${a.state} ${a.priority}`,
                           dataset: {alert: a.id, state: a.state}},
    gw.el("div", {class: "place"}, gw.place(site, a)),
    gw.el("div", {class: "text"}, texts.get(a.id) || gw.title(a.rule)),
    gw.el("div", {class: "dim"}, `${gw.title(a.rule)}${extra} - level ${a.level} - ${taken} - `,
      gw.el("span", {class: "age", dataset: {opened: a.opened_at}}, gw.age(now() - a.opened_at))),
    gw.el("div", {class: "buttons"}, ack, done));
}

function render() {
  const mine = [...alerts.values()].filter(a => texts.has(a.id))
    .sort((x, y) => y.opened_at - x.opened_at);
  cards.replaceChildren(...mine.map(card));
  nothing.hidden = mine.length > 0;
}

function setState(connected) {
  offline.hidden = connected;
}

document.getElementById("signout").addEventListener("click", async () => {
  try { await gw.api("POST", "/api/pager/signout"); } finally { location.href = "/pager/signin"; }
});

async function start() {
  const me = await gw.api("GET", "/api/pager/me");
  gw.setCsrf(me.csrf);
  gw.me = me.staff;
  document.getElementById("who").textContent = me.name;
  gw.live("/api/pager/stream", {
    check: "/api/pager/me",
    state: setState,
    snapshot(body) {
      offset = body.now - Date.now() / 1000;
      site = body.site;
      alerts = new Map(body.alerts.map(a => [a.id, a]));
      for (const page of body.pages) texts.set(page.alert, page.text);
      // Forget cards of alerts closed while we were away.
      for (const id of [...texts.keys()]) if (!alerts.has(id)) texts.delete(id);
      remember();
      render();
    },
    events: {
      alert(a) {
        if (a.state === "resolved") {
          alerts.delete(a.id);
          texts.delete(a.id);
          remember();
        } else {
          alerts.set(a.id, a);
        }
        render();
      },
      page(p) {
        if (p.state !== "resolved") texts.set(p.alert, p.text);
        remember();
        render();
        if (ALERTING.has(p.reason)) beep();
      },
      tick(body) { offset = body.now - Date.now() / 1000; },
    },
  });
}

setInterval(() => {
  for (const node of cards.querySelectorAll(".age")) {
    node.textContent = gw.age(now() - Number(node.dataset.opened));
  }
}, 1000);
start().catch(error => { message.textContent = error.message; });
