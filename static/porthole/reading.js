// Reading a session: "follow live"; jumping to an event (outline, search results, links
// between cards) even when it is folded, nested in a card, or not loaded (one request: the
// page opened at it); and a page opened at an event further back than the live tail, which
// counts live events instead of appending them, and goes live once "load newer" reaches the
// tail. Loaded with the CSP nonce after app.js; no inline script anywhere.
(function () {
  "use strict";

  function follow() { return document.getElementById("follow-live"); }

  function nearBottom() {
    return window.innerHeight + window.scrollY >= document.body.scrollHeight - 120;
  }

  // -- follow live ---------------------------------------------------------------------------
  // app.js keeps the page at the latest event while the reader is there. The toggle lets the
  // reader say "stay where I am": it turns itself off when they scroll up, and while it is
  // off, live events never move the page.
  var lastY = window.scrollY;
  var savedY = null;

  window.addEventListener("scroll", function () {
    var box = follow();
    if (box && box.checked && window.scrollY < lastY - 4 && !nearBottom()) { box.checked = false; }
    lastY = window.scrollY;
  }, { passive: true });

  document.addEventListener("htmx:wsBeforeMessage", function (evt) {
    var box = follow();
    if (evt.target.id === "session-root" && box && !box.checked) { savedY = window.scrollY; }
  });

  document.addEventListener("htmx:wsAfterMessage", function (evt) {
    if (evt.target.id !== "session-root" || savedY === null) { return; }
    window.scrollTo({ top: savedY, behavior: "instant" }); // undo app.js's follow
    lastY = savedY;
    savedY = null;
  });

  document.addEventListener("change", function (evt) {
    if (evt.target.id === "follow-live" && evt.target.checked) {
      window.scrollTo({ top: document.body.scrollHeight, behavior: "instant" });
      var jump = document.getElementById("jump-latest");
      if (jump) { jump.hidden = true; }
    }
  });

  // -- live swaps into cards that are not on this page ------------------------------------------
  // A result (or a subagent's event) arrives for a call whose card lies before the loaded
  // page: its out-of-band target is missing, and htmx would drop it (with a console error).
  // Give every missing target a place at the end of the timeline first, so nothing that
  // arrives live is ever invisible. A target that the same message brings (a catch-up that
  // holds both a call's card and its result) is not missing: the server sends what holds a
  // target before what swaps into it, so it exists by the time htmx gets there.
  var SPAN_TARGET = /^(toolstatus-|toolduration-|fold-\d+-count$)/;

  function heldTargets(parsed) {
    var ids = {};
    parsed.body.querySelectorAll("[id]").forEach(function (element) {
      if (!element.hasAttribute("hx-swap-oob")) { ids[element.id] = true; }
    });
    return ids;
  }

  document.addEventListener("htmx:wsBeforeMessage", function (evt) {
    var timeline = document.getElementById("timeline");
    if (evt.target.id !== "session-root" || !timeline || typeof evt.detail.message !== "string") { return; }
    if (windowBack()) { return; } // nothing of the events is swapped there (below)
    var parsed = new DOMParser().parseFromString(evt.detail.message, "text/html"); // inert
    var brought = null;
    parsed.body.querySelectorAll("[hx-swap-oob]").forEach(function (element) {
      var spec = element.getAttribute("hx-swap-oob") || "";
      var at = spec.indexOf(":#");
      var id = at >= 0 ? spec.slice(at + 2) : element.id;
      if (!id || document.getElementById(id)) { return; }
      brought = brought || heldTargets(parsed);
      if (brought[id]) { return; }
      var holder = document.createElement(SPAN_TARGET.test(id) ? "span" : "div");
      holder.id = id;
      if (holder.tagName === "SPAN") { holder.hidden = true; } else { holder.className = "orphan"; }
      timeline.appendChild(holder);
    });
  });

  // -- jumping to an event -------------------------------------------------------------------
  // An event's element is #event-N. A result drawn in its call's card leaves a hidden mark
  // (#event-N, data-at = the card). An event not on the page is one request away: the page
  // opened at it (?at=N), however long the session.
  function locate(seq) {
    var element = document.getElementById("event-" + seq);
    if (element && element.classList.contains("seq-mark") && element.dataset.at) {
      element = document.getElementById(element.dataset.at) || element;
    }
    return element;
  }

  function reveal(element) {
    for (var node = element; node; node = node.parentElement) {
      if (node.tagName === "DETAILS") { node.open = true; }
    }
    var box = follow();
    if (box) { box.checked = false; }
    element.scrollIntoView({ block: "center", behavior: "instant" });
    lastY = window.scrollY;
    document.querySelectorAll(".is-target").forEach(function (old) { old.classList.remove("is-target"); });
    element.classList.add("is-target");
  }

  function openedAt() {
    return new URLSearchParams(window.location.search).get("at");
  }

  // `replacing`: on arrival, so that "back" does not return to a page that jumps again.
  function jump(seq, replacing) {
    var element = locate(seq);
    if (element) { reveal(element); return; }
    if (openedAt() === String(seq)) { return; } // opened there already: not stored, or not shown
    var there = window.location.pathname + "?at=" + seq + "#event-" + seq;
    if (replacing) { window.location.replace(there); } else { window.location.assign(there); }
  }

  function seqOf(hash) {
    var match = /^#event-(\d+)$/.exec(hash || "");
    return match ? parseInt(match[1], 10) : null;
  }

  document.addEventListener("click", function (evt) {
    var link = evt.target.closest ? evt.target.closest("a[href^='#event-']") : null;
    if (!link || !document.getElementById("session-root")) { return; }
    var seq = seqOf(link.getAttribute("href"));
    if (seq === null) { return; }
    evt.preventDefault();
    history.replaceState(null, "", "#event-" + seq);
    jump(seq);
  });

  document.addEventListener("DOMContentLoaded", function () {
    var root = document.getElementById("session-root");
    if (!root) { return; }
    var seq = seqOf(window.location.hash);
    if (seq === null && root.dataset.target) { seq = parseInt(root.dataset.target, 10); }
    if (seq !== null && !isNaN(seq)) { jump(seq, true); }
  });

  // -- a window away from the live tail ---------------------------------------------------------
  // A page opened at an event further back (data-window="back") holds seqs up to
  // data-through, while its socket's hello said it holds everything up to the tail: live
  // events are not appended below the window, out of place, but counted ("N newer events").
  // Only what lies outside the event lists (the header, controls, watchers, the outline)
  // is swapped. "Load newer" appends the next events; once a page of them reaches the tail
  // and the socket has brought nothing past it, the window is live: events append again.
  var SEQS = /data-seq="(\d+)"/g;
  var heldBySocket = 0; // the newest seq the socket brought (or the hello claimed)

  function root() { return document.getElementById("session-root"); }

  function windowBack() {
    var element = root();
    return !!element && element.dataset.window === "back";
  }

  function through() { return parseInt(root().dataset.through || "0", 10) || 0; }

  function newestIn(text) {
    var newest = 0, match;
    SEQS.lastIndex = 0;
    while ((match = SEQS.exec(text)) !== null) { newest = Math.max(newest, parseInt(match[1], 10) || 0); }
    return newest;
  }

  function showNewerCount() {
    var count = document.getElementById("newer-count");
    if (!count) { return; }
    var n = Math.max(heldBySocket - through(), 0);
    count.dataset.count = String(n);
    count.textContent = n + (n === 1 ? " newer event" : " newer events");
  }

  function targetOf(element) {
    var spec = element.getAttribute("hx-swap-oob") || "true";
    var at = spec.indexOf(":#");
    var id = at >= 0 ? spec.slice(at + 2) : element.id;
    return id ? document.getElementById(id) : null;
  }

  function outsideEvents(element) {
    var target = targetOf(element);
    return !!target && !target.closest("#timeline, .older-events, #stderr-log");
  }

  function goLive() {
    var element = root();
    element.dataset.window = "live";
    element.dataset.lastSeq = String(through());
    ["newer-slot", "newer-notice"].forEach(function (id) {
      var gone = document.getElementById(id);
      if (gone) { gone.remove(); }
    });
  }

  // When the window reaches the tail: live, if the socket brought nothing past it; else
  // load what it brought (counted, not shown) first.
  function settle() {
    var slot = document.getElementById("newer-slot");
    if (!windowBack() || !slot || !slot.hasAttribute("data-at-tail")) { return; }
    if (heldBySocket === through()) { goLive(); return; }
    var more = slot.querySelector("button");
    if (heldBySocket > through() && more && !more.classList.contains("htmx-request")) {
      more.click();
    }
    // heldBySocket < through: the socket has yet to bring what the page loaded; wait for it.
  }

  if (window.htmx) {
    window.htmx.defineExtension("porthole-window", {
      transformResponse: function (text, xhr) {
        if (xhr || !windowBack() || typeof text !== "string") { return text; }
        heldBySocket = Math.max(heldBySocket, newestIn(text));
        var parsed = new DOMParser().parseFromString(text, "text/html"); // inert
        var kept = [];
        Array.prototype.forEach.call(parsed.body.children, function (element) {
          if (outsideEvents(element)) { kept.push(element.outerHTML); }
        });
        // Still said, for app.js's acknowledgements: the consumer sends a reader who does
        // not acknowledge nothing more, header and controls included.
        kept.push('<span id="held-seq" hidden hx-swap-oob="true" data-seq="' + heldBySocket + '"></span>');
        window.setTimeout(function () { showNewerCount(); settle(); }, 0);
        return kept.join("");
      }
    });
  }

  document.addEventListener("htmx:wsAfterMessage", function (evt) {
    if (evt.target.id !== "session-root" || !windowBack()) { return; }
    var jumpLatest = document.getElementById("jump-latest");
    if (jumpLatest) { jumpLatest.hidden = true; } // the newer-events link says it instead
  });

  // A page of newer events arrived (appended to #timeline) with a new #newer-slot.
  document.addEventListener("htmx:load", function (evt) {
    if (evt.target.id !== "newer-slot" || !windowBack()) { return; }
    root().dataset.through = evt.target.dataset.through || root().dataset.through;
    showNewerCount();
    settle();
  });

  document.addEventListener("DOMContentLoaded", function () {
    var element = root();
    if (element) { heldBySocket = parseInt(element.dataset.lastSeq || "0", 10) || 0; }
  });

  // -- older events, above what is being read -------------------------------------------------
  // A page of older events goes in above the timeline. Left alone, the reader would stay at
  // the same distance from the top of the page, now among the oldest of those events, with
  // what they were reading pushed far down. Keep the event they were looking at where it was.
  var readingAnchor = null;

  function eventInView() {
    var probe = document.elementFromPoint(window.innerWidth / 2, window.innerHeight / 3);
    var event = probe && probe.closest("[data-seq]");
    return event || document.getElementById("timeline");
  }

  document.addEventListener("htmx:beforeSwap", function (evt) {
    if (!evt.detail.target || evt.detail.target.id !== "older-slot") { return; }
    var element = eventInView();
    readingAnchor = element ? { element: element, top: element.getBoundingClientRect().top } : null;
  });

  document.addEventListener("htmx:afterSwap", function () {
    if (!readingAnchor) { return; }
    var moved = readingAnchor.element.getBoundingClientRect().top - readingAnchor.top;
    readingAnchor = null;
    if (moved) {
      window.scrollBy({ top: moved, behavior: "instant" });
      lastY = window.scrollY;
    }
  });

  // -- a page following a long session keeps its latest events --------------------------------
  // Every live event adds to the page: a flood followed live grew it without bound (20,000
  // cards, 140,000 elements, the browser slowing down). While following, past `KEEP`
  // top-level elements the oldest go, down to three quarters of it (a page freshly loaded
  // would not hold them either), and "Load older events" brings them back.
  var KEEP = 2000;

  function trimOldest(element) {
    var timeline = document.getElementById("timeline");
    var keep = parseInt(element.dataset.keep || "", 10) || KEEP;
    if (!timeline || timeline.children.length <= keep || !element.dataset.olderUrl) { return; }
    var first = timeline.children[timeline.children.length - Math.floor(keep * 3 / 4)];
    while (first && !first.dataset.seq) { first = first.nextElementSibling; }
    if (!first) { return; }
    while (timeline.firstElementChild !== first) { timeline.removeChild(timeline.firstElementChild); }
    document.querySelectorAll(".older-events").forEach(function (older) { older.remove(); });
    var slot = document.getElementById("older-slot");
    var button = document.createElement("button");
    button.className = "button small";
    button.type = "button";
    button.textContent = "Load older events";
    button.setAttribute("hx-get", element.dataset.olderUrl + "?before=" + first.dataset.seq);
    button.setAttribute("hx-target", "#older-slot");
    button.setAttribute("hx-swap", "outerHTML");
    slot.replaceChildren(button);
    window.htmx.process(slot);
  }

  document.addEventListener("htmx:wsAfterMessage", function (evt) {
    var box = follow();
    if (evt.target.id === "session-root" && !windowBack() && box && box.checked && nearBottom()) {
      trimOldest(evt.target);
    }
  });

  // "Follow live" in a window further back means: go to the latest events.
  document.addEventListener("change", function (evt) {
    if (evt.target.id === "follow-live" && evt.target.checked && windowBack()) {
      window.location.assign(root().dataset.latest || window.location.pathname);
    }
  });
})();
