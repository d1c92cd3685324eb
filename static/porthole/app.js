// Porthole's page behaviour. No inline scripts anywhere (the CSP forbids them): this file
// wires everything through data attributes and htmx events.
(function () {
  "use strict";

  // The highest seq this page holds: what the server rendered (data-last-seq), raised by
  // every seq a live message carried. Read from the messages, not the DOM: events land in
  // folds, cards and subagent lists, not only at the end of #timeline.
  var heldSeq = 0;
  var DATA_SEQ = /data-seq="(\d+)"/g;

  function noteSeqs(html) {
    var match;
    DATA_SEQ.lastIndex = 0;
    while ((match = DATA_SEQ.exec(html)) !== null) {
      heldSeq = Math.max(heldSeq, parseInt(match[1], 10) || 0);
    }
  }

  function lastSeq(root) {
    return Math.max(heldSeq, parseInt(root.dataset.lastSeq || "0", 10) || 0);
  }

  // -- the live session page -------------------------------------------------------------
  // Whether the reader was at the latest event when a message arrived: decided just before
  // the swap, so growing content never counts as the reader scrolling away.
  var follow = true;

  function nearBottom() {
    return window.innerHeight + window.scrollY >= document.body.scrollHeight - 120;
  }

  function scrollToLatest() {
    window.scrollTo({ top: document.body.scrollHeight, behavior: "instant" });
  }

  function setConnection(state, text) {
    var badge = document.getElementById("connection");
    if (!badge) { return; }
    badge.dataset.state = state;
    badge.textContent = text;
  }

  // -- the live session list ------------------------------------------------------------------
  var listSocket = null;

  function announceRows() {
    if (!listSocket) { return; }
    var ids = Array.prototype.map.call(
      document.querySelectorAll("#results tr[id^='row-']"),
      function (row) { return row.id.slice(4); }
    );
    listSocket.send(JSON.stringify({ rows: ids }));
  }

  document.addEventListener("htmx:afterSwap", function (evt) {
    if (evt.detail.target && evt.detail.target.id === "results") { announceRows(); }
    syncBulkMark();
    showFeedback(evt.detail.target);
  });

  // A control's reply lands in the dock, which a phone does not keep on screen (and the
  // header's "Mark as handled" is a long way above it): bring the reply into view.
  function showFeedback(target) {
    if (!target || target.id !== "control-feedback" || !target.textContent.trim()) { return; }
    var box = target.getBoundingClientRect();
    if (box.top < 0 || box.bottom > window.innerHeight) {
      target.scrollIntoView({ block: "nearest", behavior: "instant" });
    }
  }

  // "Mark all N shown as handled" names the rows that still offer a mark: a row marked by
  // its own button, or by someone else (a live update), leaves the count and the post.
  function syncBulkMark() {
    var form = document.querySelector("#results form.bulk-ack");
    if (!form) { return; }
    var ids = Array.prototype.map.call(
      document.querySelectorAll("#results tr[id^='row-']"),
      function (row) { return row.querySelector("form.ack-row") ? row.id.slice(4) : null; }
    ).filter(Boolean);
    Array.prototype.forEach.call(form.querySelectorAll("input[name='session']"), function (input) {
      input.remove();
    });
    ids.forEach(function (id) {
      var input = document.createElement("input");
      input.type = "hidden";
      input.name = "session";
      input.value = id;
      form.appendChild(input);
    });
    var n = ids.length, plural = n === 1 ? "" : "s";
    form.hidden = n === 0;
    form.setAttribute("hx-confirm", "Mark the " + n + " session" + plural +
      " shown here as handled, for the whole team? Each timeline records who did it.");
    var button = form.querySelector("button");
    if (button) { button.textContent = "Mark all " + n + " shown as handled"; }
  }
  document.addEventListener("htmx:oobAfterSwap", syncBulkMark);

  document.addEventListener("htmx:wsOpen", function (evt) {
    var root = evt.target;
    if (root.id === "session-list-root") {
      // Only rows this page shows are sent to it.
      listSocket = evt.detail.socketWrapper;
      announceRows();
    }
    if (root.id === "session-root") {
      // Tell the consumer what we hold; it replays what we missed, then goes live.
      sessionSocket = evt.detail.socketWrapper;
      acked = lastSeq(root);
      sessionSocket.sendImmediately(JSON.stringify({ last_seq: acked }));
    }
    openedAt = Date.now();
    setConnection("live", "live");
  });

  // -- reconnecting ----------------------------------------------------------------------------
  // htmx's ws extension reopens a socket only after 1006, 1011, 1012 and 1013; a clean close
  // (1000 from a proxy, 1001, 1005, ...) would leave the page
  // frozen. Every other close is retried here, with capped exponential backoff and full
  // jitter, except a "go away" (4400-4499: access revoked, link expired, signed out). The
  // new socket's hello carries the last seq held, so the page catches up exactly.
  var RETRIED_BY_HTMX = [1006, 1011, 1012, 1013];
  var BACKOFF_BASE_MS = 500;
  var BACKOFF_CAP_MS = 30000;
  var STABLE_MS = 10000;  // open this long and the next close starts the backoff afresh
  var attempts = 0;
  var openedAt = 0;

  function goAway(code) { return code >= 4400 && code < 4500; }

  function reconnectDelay() {
    var ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * Math.pow(2, attempts));
    attempts += 1;
    return Math.random() * ceiling;
  }

  document.addEventListener("htmx:wsClose", function (evt) {
    var detail = evt.detail || {};
    var code = detail.event ? detail.event.code : 1006;
    if (openedAt && Date.now() - openedAt >= STABLE_MS) { attempts = 0; }
    openedAt = 0;
    if (goAway(code)) {
      setConnection("closed", "disconnected: reload to see more");
      return;
    }
    setConnection("offline", "reconnecting…");
    var wrapper = detail.socketWrapper;
    if (RETRIED_BY_HTMX.indexOf(code) >= 0 || !wrapper || !wrapper.reconnect) { return; }
    var root = evt.target;
    window.setTimeout(function () {
      if (document.body.contains(root)) { wrapper.reconnect(); }
    }, reconnectDelay());
  });

  // -- flow control ----------------------------------------------------------------------------
  // The consumer sends at most a window of events past the last seq this page acknowledged
  // (then it waits, and catches the page up from the database once it acknowledges again),
  // so a page that cannot keep up never makes the server buffer without bound. Acknowledge
  // every ACK_EVERY events, and within a second in a quieter stretch (at most one a second
  // then: hundreds of viewers acknowledging cost the server little).
  var ACK_EVERY = 250;
  var ACK_AFTER_MS = 1000;
  var sessionSocket = null;
  var acked = 0;
  var ackTimer = null;

  function acknowledge() {
    ackTimer = null;
    var root = document.getElementById("session-root");
    if (!sessionSocket || !root) { return; }
    var held = lastSeq(root);
    if (held > acked) {
      acked = held;
      sessionSocket.send(JSON.stringify({ ack: held }));
    }
  }

  function received(root) {
    if (lastSeq(root) - acked >= ACK_EVERY) {
      if (ackTimer) { window.clearTimeout(ackTimer); }
      acknowledge();
    } else if (!ackTimer) {
      ackTimer = window.setTimeout(acknowledge, ACK_AFTER_MS);
    }
  }

  document.addEventListener("htmx:wsBeforeMessage", function (evt) {
    if (evt.target.id === "session-root") { follow = nearBottom(); }
  });

  // The prompt box survives live swaps of the controls (hx-preserve keeps what is typed),
  // and with it the placeholder it was drawn with: "Queue a follow-up" once the agent is idle.
  function syncPromptPlaceholder() {
    var controls = document.getElementById("controls");
    var box = document.getElementById("id_text");
    if (controls && box && controls.dataset.promptPlaceholder) {
      box.placeholder = controls.dataset.promptPlaceholder;
    }
  }

  document.addEventListener("htmx:wsAfterMessage", function (evt) {
    if (evt.target.id !== "session-root") { return; }
    syncPromptPlaceholder();
    if (typeof evt.detail.message === "string") { noteSeqs(evt.detail.message); }
    received(evt.target);
    var empty = document.getElementById("empty-timeline");
    if (empty && document.getElementById("timeline").children.length) { empty.remove(); }
    var jump = document.getElementById("jump-latest");
    if (follow) { scrollToLatest(); } else if (jump) { jump.hidden = false; }
  });

  window.addEventListener("scroll", function () {
    var jump = document.getElementById("jump-latest");
    if (jump && nearBottom()) { jump.hidden = true; }
  }, { passive: true });

  document.addEventListener("click", function (evt) {
    var target = evt.target.closest ? evt.target.closest("#jump-latest") : null;
    if (target) {
      follow = true;
      target.hidden = true;
      scrollToLatest();
    }
    // Plain (non-htmx) forms with a data-confirm button ask before submitting.
    var confirmButton = evt.target.closest ? evt.target.closest("button[data-confirm]") : null;
    if (confirmButton && !confirmButton.form.hasAttribute("hx-post")) {
      if (!window.confirm(confirmButton.dataset.confirm)) { evt.preventDefault(); }
    }
  });

  // Ctrl/Cmd+Enter sends a prompt.
  document.addEventListener("keydown", function (evt) {
    if (evt.key === "Enter" && (evt.ctrlKey || evt.metaKey) && evt.target.tagName === "TEXTAREA") {
      var form = evt.target.form;
      if (form) { evt.preventDefault(); form.requestSubmit(); }
    }
  });

  // A prompt that went through leaves an empty box. hx-preserve keeps the box across live
  // updates of the controls, and such an update usually lands before the reply, detaching
  // the form that sent it (htmx then fires its events on the detached form only). So note
  // what was sent while the form is still attached, and clear the box on the reply itself.
  document.addEventListener("htmx:beforeRequest", function (evt) {
    var form = evt.detail.elt;
    if (!form || !form.classList || !form.classList.contains("prompt-form")) { return; }
    var box = form.querySelector("textarea");
    if (!box || !box.id) { return; }
    var id = box.id, sent = box.value;
    evt.detail.xhr.addEventListener("loadend", function () {
      var status = evt.detail.xhr.status;
      var current = document.getElementById(id);
      if (status >= 200 && status < 300 && current && current.value === sent) { current.value = ""; }
    });
  });

  document.addEventListener("DOMContentLoaded", function () {
    syncBulkMark();
    if (document.getElementById("session-root")) {
      // A reload would restore the old position and stop following; a session page opens at
      // its latest event instead.
      if ("scrollRestoration" in history) { history.scrollRestoration = "manual"; }
      scrollToLatest();
    }
  });
})();
