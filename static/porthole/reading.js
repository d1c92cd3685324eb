// Reading a session: "follow live", and jumping to an event (outline, search results, links
// between cards) even when it is folded, nested in a card, or not loaded yet. Loaded with
// the CSP nonce after app.js; no inline script anywhere.
(function () {
  "use strict";

  var MAX_OLDER_LOADS = 200; // "Load older" clicks while looking for an event

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
  // (#event-N, data-at = the card); an event not loaded yet is found by loading older pages.
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

  var pending = null; // {seq, loads}

  function jump(seq) {
    var element = locate(seq);
    if (element) { pending = null; reveal(element); return; }
    var older = document.querySelector("#older-slot button");
    if (!older) { pending = null; return; }
    var first = parseInt((older.getAttribute("hx-get") || "").split("before=")[1], 10);
    if (first && seq >= first) { pending = null; return; } // not stored (or not shown here)
    pending = { seq: seq, loads: pending && pending.seq === seq ? pending.loads + 1 : 1 };
    if (pending.loads > MAX_OLDER_LOADS) { pending = null; return; }
    older.click();
  }

  // A page of older events arrives with a new #older-slot (its swap is outerHTML).
  document.addEventListener("htmx:load", function (evt) {
    if (pending && evt.target.id === "older-slot") { jump(pending.seq); }
  });

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
    var seq = seqOf(window.location.hash);
    if (seq !== null && document.getElementById("session-root")) { jump(seq); }
  });
})();
