// The technician's page: accounts, pager PINs and wall display links.
"use strict";

const {el} = gw;
const message = document.getElementById("message");

function say(text, ok) {
  message.textContent = text;
  message.className = ok ? "ok" : "bad";
}

async function act(method, path, body, done) {
  try {
    const result = await gw.api(method, path, body);
    say(done, true);
    await load();
    return result;
  } catch (error) {
    if (error.status !== 401) say(error.message, false);
    return null;
  }
}

async function load() {
  const [accounts, staff, displays] = await Promise.all([
    gw.api("GET", "/api/accounts"), gw.api("GET", "/api/staff"), gw.api("GET", "/api/display-tokens")]);
  document.querySelector("#accounts tbody").replaceChildren(...accounts.map(a =>
    el("tr", {dataset: {account: a.name}}, el("td", {}, a.name), el("td", {}, a.role), el("td", {}, a.staff || ""),
      el("td", {class: "actions"}, el("button", {class: "quiet",
        onclick: () => act("DELETE", `/api/accounts/${encodeURIComponent(a.name)}`, undefined,
          `Account ${a.name} deleted.`)}, "Delete")))));
  const select = document.getElementById("staff-select");
  select.replaceChildren(el("option", {value: ""}, "(none)"),
    ...staff.map(s => el("option", {value: s.id}, `${s.name} (${s.id})`)));
  document.querySelector("#staff tbody").replaceChildren(...staff.map(s => {
    const pin = el("input", {type: "password", inputmode: "numeric", size: 8, placeholder: "4-8 digits"});
    return el("tr", {dataset: {staff: s.id}}, el("td", {}, `${s.name} (${s.id})`),
      el("td", {}, s.roles.join(", ")), el("td", {}, s.has_pin ? "set" : "none"),
      el("td", {class: "actions"}, pin, el("button", {
        onclick: () => act("PUT", `/api/staff/${encodeURIComponent(s.id)}/pin`, {pin: pin.value},
          `PIN of ${s.name} set.`)}, "Set PIN")));
  }));
  document.querySelector("#displays tbody").replaceChildren(...displays.filter(d => !d.revoked_at).map(d =>
    el("tr", {}, el("td", {}, d.label), el("td", {}, d.created_by), el("td", {}, gw.time(d.created_at)),
      el("td", {class: "actions"}, el("button", {class: "quiet",
        onclick: () => act("DELETE", `/api/display-tokens/${d.id}`, undefined, "Display link revoked.")},
        "Revoke")))));
}

document.getElementById("account-form").addEventListener("submit", event => {
  event.preventDefault();
  const f = Object.fromEntries(new FormData(event.target));
  const body = {role: f.role, staff: f.staff || null};
  if (f.password) body.password = f.password;
  act("PUT", `/api/accounts/${encodeURIComponent(f.name)}`, body, `Account ${f.name} saved.`);
});

document.getElementById("display-form").addEventListener("submit", async event => {
  event.preventDefault();
  const label = new FormData(event.target).get("label");
  const made = await act("POST", "/api/display-tokens", {label}, "Display link made; it is shown once.");
  if (made) {
    const box = document.getElementById("display-link");
    box.hidden = false;
    box.textContent = `Open on the wall screen: ${location.origin}${made.url}`;
  }
});

document.getElementById("signout").addEventListener("click", async () => {
  try { await gw.api("POST", "/api/signout"); } finally { location.href = "/signin"; }
});

(async () => {
  const me = await gw.api("GET", "/api/session");
  gw.setCsrf(me.csrf);
  document.getElementById("me").textContent = `${me.name} (${me.role})`;
  await load();
})().catch(error => say(error.message, false));
