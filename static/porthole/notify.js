// Porthole: browser notifications and the attention count in the tab title.
//
// One tab of the browser (the holder of a Web Lock) polls the attention feed and shows the
// notifications; it tells the other tabs the count over a BroadcastChannel. What was already
// told is remembered in localStorage, and each notification carries a tag, so several tabs,
// or a tab that takes over from a closed one, never repeat it. The permission is asked only
// after a click on the toggle. Sessions opened in this browser are "watched" for a few days,
// on top of the ones the person started.
(() => {
  "use strict";
  const script = document.currentScript;
  const feedUrl = script && script.dataset.feed;
  if (!feedUrl) { return; }
  const pollMs = Number(script.dataset.pollMs || 5000);
  const KEY_ENABLED = "porthole.notify.enabledAt";
  const KEY_SEEN = "porthole.notify.seen";
  const KEY_WATCHED = "porthole.notify.watched";
  const WATCH_DAYS = 3;
  const WATCH_LIMIT = 50;
  const channel = "BroadcastChannel" in window ? new BroadcastChannel("porthole-attention") : null;
  const baseTitle = document.title;
  let leading = false;
  let lastCount = null;

  const read = (key, fallback) => {
    try { const v = JSON.parse(localStorage.getItem(key)); return v === null ? fallback : v; }
    catch (e) { return fallback; }
  };
  const write = (key, value) => {
    try { localStorage.setItem(key, JSON.stringify(value)); } catch (e) { /* private mode */ }
  };

  // -- watching: the session pages this browser opened ---------------------------------------
  const sessionPage = location.pathname.match(/^\/sessions\/([0-9a-f-]{36})\/$/);
  const watched = () => {
    const cutoff = Date.now() - WATCH_DAYS * 86400000;
    return read(KEY_WATCHED, []).filter((w) => w && w.at > cutoff).slice(-WATCH_LIMIT);
  };
  if (sessionPage) {
    const list = watched().filter((w) => w.id !== sessionPage[1]);
    list.push({ id: sessionPage[1], at: Date.now() });
    write(KEY_WATCHED, list.slice(-WATCH_LIMIT));
  }

  // -- the toggle and the count ----------------------------------------------------------------
  const toggle = document.getElementById("notify-toggle");
  const countLink = document.getElementById("attention-count");
  const supported = "Notification" in window;
  const enabled = () => supported && Notification.permission === "granted" && !!read(KEY_ENABLED, 0);

  const showToggle = () => {
    if (!toggle || !supported) { return; }
    toggle.hidden = false;
    const on = enabled();
    toggle.setAttribute("aria-pressed", on ? "true" : "false");
    toggle.textContent = on ? "Notifications on" : "Notifications off";
    toggle.title = Notification.permission === "denied"
      ? "This browser blocks notifications from this site: allow them in its settings."
      : on ? "Click to stop notifications in this browser" : "Click to be notified when your sessions finish, fail or need attention";
  };

  const showCount = (count) => {
    document.title = count > 0 ? `(${count}) ${baseTitle}` : baseTitle;
    if (countLink) {
      countLink.hidden = !(count > 0);
      const words = `${count === 1 ? "session needs" : "sessions need"} attention`;
      const number = document.createElement("strong");
      number.textContent = String(count);
      const label = document.createElement("span");
      label.className = "words";
      label.textContent = ` ${count === 1 ? "needs" : "need"} attention`;
      countLink.replaceChildren(number, label);
      countLink.title = `${count} ${words}`;
    }
  };

  if (toggle && supported) {
    toggle.addEventListener("click", async () => {
      if (enabled()) {
        write(KEY_ENABLED, 0);
      } else {
        const permission = Notification.permission === "granted"
          ? "granted" : await Notification.requestPermission();
        if (permission === "granted") {
          write(KEY_ENABLED, Date.now());
        }
      }
      showToggle();
      if (channel) { channel.postMessage({ type: "toggle" }); }
    });
  }
  showToggle();

  // -- polling and notifying (the leader tab only) ------------------------------------------------
  const notify = (item) => {
    const words = { "session.failed": "failed", "session.finished": "finished",
      "session.lost": "was lost", "session.needs_attention": "needs attention" };
    const note = new Notification(`${item.title} ${words[item.kind] || item.kind}`, {
      body: item.reasons.length ? item.reasons.join("; ") : item.status,
      tag: `porthole:${item.id}:${item.key}`,
    });
    note.addEventListener("click", () => { window.focus(); location.assign(item.url); note.close(); });
    document.dispatchEvent(new CustomEvent("porthole:notified", { detail: item }));
  };

  const poll = async () => {
    const ids = watched().map((w) => w.id).join(",");
    const url = ids ? `${feedUrl}?watch=${encodeURIComponent(ids)}` : feedUrl;
    let data;
    try {
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!response.ok) { return; }
      data = await response.json();
    } catch (e) { return; }  // offline or signed out: try again later
    showCount(data.count);
    lastCount = data.count;
    if (channel) { channel.postMessage({ type: "count", count: data.count }); }
    const seen = read(KEY_SEEN, {});
    const since = read(KEY_ENABLED, 0);
    for (const item of data.sessions) {
      if (!item.key || seen[item.id] === item.key) { continue; }
      seen[item.id] = item.key;
      // Only news: what changed after notifications were turned on.
      if (enabled() && Date.parse(item.changed_at) >= since - 1000) { notify(item); }
    }
    // Forget sessions the feed no longer lists, so the map stays small.
    const listed = new Set(data.sessions.map((s) => s.id));
    for (const id of Object.keys(seen)) { if (!listed.has(id)) { delete seen[id]; } }
    write(KEY_SEEN, seen);
  };

  const lead = async () => {
    leading = true;
    for (;;) {
      await poll();
      await new Promise((resolve) => setTimeout(resolve, pollMs));
    }
  };

  // A mark on this page changes the count now: the leader polls at once, wherever it is. The
  // server names it in the reply's HX-Trigger, read off the request itself: htmx fires the
  // event on the form that posted, which a live update of its row has often detached by then.
  const refresh = () => {
    if (leading || !channel) { poll(); } else { channel.postMessage({ type: "refresh" }); }
  };
  document.addEventListener("htmx:beforeRequest", (event) => {
    const xhr = event.detail && event.detail.xhr;
    if (!xhr) { return; }
    xhr.addEventListener("loadend", () => {
      if ((xhr.getResponseHeader("HX-Trigger") || "").includes("porthole:attention-changed")) {
        refresh();
      }
    });
  });

  if (channel) {
    channel.addEventListener("message", (event) => {
      if (event.data && event.data.type === "count") { showCount(event.data.count); }
      if (event.data && event.data.type === "refresh" && leading) { poll(); }
      if (event.data && event.data.type === "toggle") { showToggle(); }
      if (event.data && event.data.type === "hello" && leading && lastCount !== null) {
        channel.postMessage({ type: "count", count: lastCount });
      }
    });
    channel.postMessage({ type: "hello" });  // a new tab asks the leader for the count
  }
  if (navigator.locks) {
    // Held until this tab closes; then the next tab in line takes over.
    navigator.locks.request("porthole-attention-leader", () => lead());
  } else {
    lead();  // no Web Locks: every tab polls; `seen` and the tags keep it to one notification
  }
})();
