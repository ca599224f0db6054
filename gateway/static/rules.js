// The technician's rules page: one YAML editor per rule, problems shown next
// to the rule and field, a dry run on recorded events, save, versions, roll
// back and the audit log.
"use strict";

const {el} = gw;
const message = document.getElementById("message");
let running = null;   // the running version's number
let cards = [];       // {name, original, node, text, removed}

function say(text, ok) {
  message.textContent = text;
  message.className = ok ? "ok" : "bad";
}

function failed(error) {
  if (error.status !== 401) say(error.message, false);
}

const edited = () => cards.some(c => c.removed || c.original === null || c.text.value !== c.original);

function summary(rule) {
  const parts = [rule.kind || "call"];
  if (rule.priority) parts.push(rule.priority);
  parts.push(`${rule.levels} level${rule.levels === 1 ? "" : "s"}`);
  return parts.join(" · ");
}

function card(rule) {
  const lines = rule ? rule.yaml.split("\n").length : 5;
  const text = el("textarea", {class: "yaml", spellcheck: "false", rows: Math.max(6, lines + 1),
    hidden: rule !== null});
  const item = {name: rule ? rule.name : null, original: rule ? rule.yaml : null, text, removed: false};
  text.value = rule ? rule.yaml : "name: new-rule\ndevices: {kind: call_button}\nlevels:\n- {after: 0s, roles: []}\n";
  const toggle = el("input", {type: "checkbox", class: "enabled", checked: rule ? rule.enabled !== false : true,
    disabled: rule === null, title: "Switch the rule on or off: a new version at once"});
  toggle.addEventListener("change", () => switchRule(item, toggle));
  const edit = el("button", {class: "quiet edit", type: "button",
    onclick: () => { text.hidden = !text.hidden; if (!text.hidden) text.focus(); }}, "Edit");
  const remove = el("button", {class: "quiet remove", type: "button", onclick: () => {
    item.removed = !item.removed;
    item.node.classList.toggle("removed", item.removed);
    remove.textContent = item.removed ? "Keep" : "Remove";
    changed();
  }}, "Remove");
  text.addEventListener("input", changed);
  item.node = el("section", {class: "rule", dataset: {name: item.name || ""}},
    el("div", {class: "rule-head"},
      el("label", {class: "switch"}, toggle, el("span", {}, "on")),
      el("strong", {class: "name"}, item.name || "new rule"),
      el("span", {class: "dim"}, rule ? summary(rule) : "not saved yet"),
      el("span", {class: "edited", hidden: rule !== null}, "edited"),
      el("span", {class: "grow"}), edit, remove),
    text, el("ul", {class: "problems"}));
  return item;
}

function changed() {
  for (const c of cards) {
    c.node.querySelector(".edited").hidden = !(c.original === null || c.text.value !== c.original);
  }
  const dirty = edited();
  for (const c of cards) {
    c.node.querySelector(".enabled").disabled = dirty || c.original === null;
  }
  document.getElementById("version-note").dataset.dirty = dirty ? "yes" : "";
}

function proposed() {
  const kept = cards.filter(c => !c.removed);
  return {kept, rules: kept.map(c => c.text.value)};
}

// Problems go next to their rule (opening its editor) and name the field and line.
function show(problems, kept) {
  for (const c of cards) {
    c.node.classList.remove("invalid");
    c.node.querySelector(".problems").replaceChildren();
  }
  const general = [];
  for (const p of problems) {
    const target = p.rule === null ? null : kept[p.rule];
    if (!target) { general.push(`${p.field}: ${p.message}`); continue; }
    target.node.classList.add("invalid");
    target.text.hidden = false;
    target.node.querySelector(".problems").append(el("li", {dataset: {field: p.field}},
      p.field ? el("code", {}, p.field) : null,
      p.line ? el("span", {class: "dim"}, ` line ${p.line}`) : null,
      `${p.field || p.line ? ": " : ""}${p.message}`));
  }
  document.getElementById("set-problems").textContent = general.join("; ");
}

async function validate() {
  const {kept, rules} = proposed();
  const result = await gw.api("POST", "/api/ruleset/validate", {rules});
  show(result.problems, kept);
  return result.ok;
}

async function check() {
  try {
    say(await validate() ? "No problems found." : "Problems found; see the rules marked in red.", false);
    if (!document.querySelector(".rule.invalid")) message.className = "ok";
  } catch (error) { failed(error); }
}

async function save() {
  try {
    if (!await validate()) { say("Not saved: fix the problems marked in red first.", false); return; }
    const comment = document.getElementById("comment").value;
    const done = await gw.api("PUT", "/api/ruleset", {rules: proposed().rules, comment, base: running});
    document.getElementById("comment").value = "";
    say(`Saved as version ${done.version}; it runs now.`, true);
    await load();
  } catch (error) { failed(error); }
}

async function switchRule(item, toggle) {
  try {
    const done = await gw.api("PUT", `/api/rules/${encodeURIComponent(item.name)}/enabled`,
      {enabled: toggle.checked, base: running});
    say(`${item.name} switched ${toggle.checked ? "on" : "off"}: version ${done.version}.`, true);
    await load();
  } catch (error) { toggle.checked = !toggle.checked; failed(error); }
}

function pages(alert) {
  if (!alert) return "-";
  const levels = alert.paged.map(l => `L${l.level}: ${(l.paged.length ? l.paged : [...l.roles, ...l.staff,
    ...l.groups, ...l.zones]).join(", ")}`);
  const end = alert.closed_at ? `closed (${alert.closed_via}) ${gw.time(alert.closed_at)}` : "open at the end";
  return `level ${alert.level} · ${levels.join("; ")} · ${end}`;
}

async function dryRun() {
  try {
    const {kept, rules} = proposed();
    const hours = Number(document.getElementById("hours").value) || 24;
    say("Replaying the recorded events...", true);
    const result = await gw.api("POST", "/api/ruleset/dry-run", {rules, hours});
    if (result.problems) { show(result.problems, kept); return; }
    show([], kept);
    const d = result.differences;
    document.getElementById("dry").hidden = false;
    document.getElementById("dry-summary").textContent =
      `${result.events} events${result.truncated ? " (the newest only)" : ""} since ${gw.time(result.start)}: ` +
      `running rules ${result.current.count} alerts, edited rules ${result.proposed.count}. ` +
      `${d.only_proposed} new, ${d.only_current} gone, ${d.changed} changed, ${d.same} the same.`;
    const rows = new Map();
    for (const a of result.current.alerts) rows.set(a.key, {current: a, proposed: null, change: a.change});
    for (const a of result.proposed.alerts) {
      const row = rows.get(a.key) || {current: null, change: a.change};
      row.proposed = a;
      rows.set(a.key, row);
    }
    const sorted = [...rows.values()].sort((x, y) =>
      (x.current || x.proposed).opened_at - (y.current || y.proposed).opened_at);
    document.querySelector("#dry-table tbody").replaceChildren(...sorted.map(r => {
      const a = r.current || r.proposed;
      return el("tr", {class: r.change, dataset: {change: r.change}},
        el("td", {}, a.rule), el("td", {}, a.room || a.zone || a.device), el("td", {}, gw.time(a.opened_at)),
        el("td", {class: "side"}, pages(r.current)), el("td", {class: "side"}, pages(r.proposed)));
    }));
    say(`Dry run done in ${result.seconds} s.`, true);
  } catch (error) { failed(error); }
}

async function rollback(number) {
  try {
    const done = await gw.api("POST", `/api/ruleset/versions/${number}/rollback`, {comment: ""});
    say(`Rolled back to version ${number}: now version ${done.version}.`, true);
    await load();
  } catch (error) { failed(error); }
}

async function view(number) {
  try {
    const v = await gw.api("GET", `/api/ruleset/versions/${number}`);
    document.getElementById("version-view").hidden = false;
    document.getElementById("version-view-title").textContent =
      `Version ${v.number}, saved by ${v.saved_by} ${new Date(v.saved_at * 1000).toLocaleString()}`;
    document.getElementById("version-view-text").textContent = v.rules.map(r => r.yaml).join("---\n");
  } catch (error) { failed(error); }
}

function detail(row) {
  const d = row.detail || {};
  const parts = [];
  if (d.comment) parts.push(`"${d.comment}"`);
  for (const key of ["added", "removed", "changed"]) {
    if (d[key] && d[key].length) parts.push(`${key}: ${d[key].join(", ")}`);
  }
  if (d.restored_from) parts.push(`copy of version ${d.restored_from}`);
  for (const key of ["zone", "device", "minutes", "reason"]) if (d[key]) parts.push(`${key}: ${d[key]}`);
  return parts.join("; ");
}

async function load() {
  const [current, history, log] = await Promise.all([gw.api("GET", "/api/rules"),
    gw.api("GET", "/api/ruleset/versions"), gw.api("GET", "/api/ruleset/audit")]);
  running = current.version.number;
  const v = current.version;
  document.getElementById("version").textContent = `version ${v.number}`;
  document.getElementById("version-note").textContent =
    `Saved by ${v.saved_by} ${new Date(v.saved_at * 1000).toLocaleString()}` +
    (v.comment ? `: ${v.comment}` : "");
  cards = current.rules.map(card);
  document.getElementById("rules").replaceChildren(...cards.map(c => c.node));
  document.getElementById("set-problems").textContent = "";
  changed();
  document.querySelector("#versions tbody").replaceChildren(...history.versions.map(h =>
    el("tr", {dataset: {version: h.number}, class: h.number === history.running ? "selected" : null},
      el("td", {}, String(h.number)), el("td", {}, new Date(h.saved_at * 1000).toLocaleString()),
      el("td", {}, h.saved_by), el("td", {}, h.action + (h.number === history.running ? " (running)" : "")),
      el("td", {}, h.comment || ""), el("td", {}, String(h.rules)),
      el("td", {class: "actions"},
        el("button", {class: "quiet", type: "button", onclick: () => view(h.number)}, "View"),
        h.number === history.running ? null : el("button", {class: "quiet rollback", type: "button",
          onclick: () => rollback(h.number)}, "Roll back")))));
  document.querySelector("#audit tbody").replaceChildren(...log.map(row =>
    el("tr", {}, el("td", {}, new Date(row.at * 1000).toLocaleString()), el("td", {}, row.by),
      el("td", {}, row.action), el("td", {}, row.target || ""), el("td", {}, row.version ? String(row.version) : ""),
      el("td", {}, detail(row)))));
}

document.getElementById("add").addEventListener("click", () => {
  const item = card(null);
  cards.push(item);
  document.getElementById("rules").append(item.node);
  item.text.focus();
  changed();
});
document.getElementById("check").addEventListener("click", check);
document.getElementById("save").addEventListener("click", save);
document.getElementById("dry-run").addEventListener("click", dryRun);
document.getElementById("signout").addEventListener("click", async () => {
  try { await gw.api("POST", "/api/signout"); } finally { location.href = "/signin"; }
});

async function start() {
  const me = await gw.api("GET", "/api/session");
  gw.setCsrf(me.csrf);
  document.getElementById("me").textContent = `${me.name} (${me.role})`;
  await load();
}

start().catch(failed);
