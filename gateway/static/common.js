// Shared by every page: the JSON API with its CSRF token, a live stream that
// reconnects by itself, and small formatting helpers. No framework, no CDN:
// the gateway has no internet on site.
"use strict";

const gw = (() => {
  let csrf = null;

  function cookie(name) {
    const found = document.cookie.split("; ").find(c => c.startsWith(name + "="));
    return found ? decodeURIComponent(found.slice(name.length + 1)) : null;
  }

  function explain(data, response) {
    const detail = data && data.detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      // FastAPI's validation errors: say which field and why.
      return detail.map(d => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
    }
    return `${response.status} ${response.statusText}`;
  }

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  // Calls the JSON API. Changes carry the session's CSRF token, or before
  // signing in the value of the gw_csrf cookie (double submit).
  async function api(method, path, body) {
    const headers = {"Accept": "application/json"};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (method !== "GET") headers["X-CSRF-Token"] = csrf || cookie("gw_csrf") || "";
    const response = await fetch(path, {
      method, headers, cache: "no-store", credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try { data = await response.json(); } catch (ignored) { data = null; }
    if (response.status === 401 && data && data.sign_in) {
      signIn(data.sign_in);
      throw new ApiError(401, "signed out");
    }
    if (!response.ok) throw new ApiError(response.status, explain(data, response));
    return data;
  }

  function signIn(where) {
    const next = location.pathname === "/" ? "/floor" : location.pathname;
    location.href = where === "/setup" ? where : `${where}?next=${encodeURIComponent(next)}`;
  }

  // A Server-Sent Events stream that shows its state and reconnects by
  // itself: after the gateway restarts, the network returns, or a phone
  // wakes. A stream silent for longer than WATCHDOG is taken as dead (the
  // gateway sends a "tick" every 15 s).
  const WATCHDOG = 35000;

  function live(url, {check, snapshot, events, state}) {
    let source = null;
    let retry = null;
    let watchdog = null;
    let delay = 1000;

    function alive() {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => lost("no word from the gateway"), WATCHDOG);
    }

    function connect() {
      clearTimeout(retry);
      if (source) source.close();
      source = new EventSource(url);
      source.addEventListener("snapshot", e => {
        delay = 1000;
        alive();
        state(true);
        snapshot(JSON.parse(e.data));
      });
      for (const [name, handle] of Object.entries(events)) {
        source.addEventListener(name, e => { alive(); handle(JSON.parse(e.data)); });
      }
      source.onerror = () => lost("connection lost");
    }

    async function lost(why) {
      clearTimeout(watchdog);
      if (source) source.close();
      source = null;
      state(false, why);
      // EventSource cannot tell a dead network from a finished session.
      try {
        const response = await fetch(check, {cache: "no-store", credentials: "same-origin"});
        if (response.status === 401) {
          const data = await response.json();
          signIn(data.sign_in || "/signin");
          return;
        }
      } catch (ignored) { /* the gateway is not reachable yet */ }
      clearTimeout(retry);
      retry = setTimeout(connect, delay);
      delay = Math.min(delay * 2, 5000);
    }

    const wake = () => { if (!source || source.readyState === EventSource.CLOSED) connect(); };
    document.addEventListener("visibilitychange", () => { if (!document.hidden) wake(); });
    window.addEventListener("online", wake);
    window.addEventListener("offline", () => lost("this device is offline"));
    connect();
  }

  function age(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const mm = h ? String(m).padStart(2, "0") : String(m);
    return `${h ? h + ":" : ""}${mm}:${String(s % 60).padStart(2, "0")}`;
  }

  function title(rule) {
    const words = (rule || "").replace(/[-_]/g, " ");
    return words.charAt(0).toUpperCase() + words.slice(1);
  }

  function place(site, a) {
    if (a.room) return site.rooms[a.room] || a.room;
    return site.zones[a.zone] || a.zone || a.device;
  }

  function time(ts) {
    return ts ? new Date(ts * 1000).toLocaleTimeString() : "";
  }

  // Builds an element: el("button", {class: "x", onclick: f}, "text", child).
  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    node.append(...children.filter(c => c !== null && c !== undefined));
    return node;
  }

  return {
    api, live, age, title, place, time, el, ApiError,
    setCsrf(token) { csrf = token; },
  };
})();
