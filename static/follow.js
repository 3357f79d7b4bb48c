// Follow the audit trail live: new rows appear at the top of the table without a reload.
// Progressive enhancement: without JavaScript the page works as before and the button stays hidden.
(function () {
  "use strict";
  var button = document.getElementById("follow-toggle");
  var status = document.getElementById("follow-status");
  var rows = document.getElementById("live-rows");
  if (!button || !rows || !window.EventSource) { return; }
  var LABELS = JSON.parse(button.getAttribute("data-labels") || "{}");  // events.LABELS, from the page
  var source = null;
  button.hidden = false;

  var COLUMNS = ["Time (UTC)", "Event", "User", "Session", "Address", "Browser", "Reason", "By"];
  function cell(tr, text, child) {
    var td = document.createElement("td");
    td.setAttribute("data-label", COLUMNS[tr.children.length]);
    if (child) { td.appendChild(child); } else { td.textContent = text == null || text === "" ? "—" : text; }
    tr.appendChild(td);
    return td;
  }
  function link(href, text, title, cls) {
    var a = document.createElement("a");
    a.href = href; a.textContent = text;
    if (title) { a.title = title; }
    if (cls) { a.className = cls; }
    return a;
  }
  function shortUa(ua) {
    var m = /(Firefox|Edg|OPR|Chrome|Version)\/(\d+)/.exec(ua) || [];
    var name = {Edg: "Edge", OPR: "Opera", Version: "Safari"}[m[1]] || m[1];
    var os = /Windows|Android|iPhone|iPad|Mac OS X|Linux/.exec(ua);
    if (!name) { return ua.length > 40 ? ua.slice(0, 40) + "…" : ua; }
    return name + " " + m[2] + (os ? " on " + os[0].replace("Mac OS X", "macOS") : "");
  }
  function row(ev) {
    var tr = document.createElement("tr");
    tr.id = "ev-" + ev.id;
    tr.className = "new";
    var when = document.createElement("time");
    when.dateTime = ev.at;
    when.textContent = ev.at.replace("T", " ").slice(0, 19) + " UTC";
    var td = cell(tr, null, when);
    td.appendChild(document.createElement("br"));
    var ago = document.createElement("span");
    ago.className = "muted"; ago.textContent = "just now";
    td.appendChild(ago);
    var badge = document.createElement("span");
    badge.className = "ev ev-" + ev.type; badge.textContent = LABELS[ev.type] || ev.type;
    cell(tr, null, badge);
    cell(tr, ev.user ? ev.user : null, ev.user ? link("/admin/audit?user=" + encodeURIComponent(ev.user), ev.user) : null);
    cell(tr, null, ev.session ? link("/admin/sessions/" + ev.session, ev.session.slice(0, 8), ev.session, "mono") : null);
    cell(tr, ev.ip);
    if (ev.user_agent) {
      var ua = document.createElement("span");
      ua.title = ev.user_agent; ua.textContent = shortUa(ev.user_agent);
      cell(tr, null, ua);
    } else { cell(tr, null); }
    var reason = cell(tr, ev.reason || "");
    if (ev.count && ev.count !== 1) {
      var count = document.createElement("span");
      count.className = "count"; count.textContent = " ×" + ev.count;
      reason.appendChild(count);
    }
    cell(tr, ev.actor || "");
    return tr;
  }
  function say(text) { status.textContent = text; }
  function start() {
    var last = rows.querySelector("tr");
    var url = button.getAttribute("data-url");
    if (last && last.id.indexOf("ev-") === 0) { url += (url.indexOf("?") < 0 ? "?" : "&") + "last_id=" + last.id.slice(3); }
    source = new EventSource(url);
    source.onopen = function () { say("Following: new events appear at the top."); };
    source.onerror = function () { say("Connection lost; reconnecting…"); };
    source.onmessage = function (message) {
      var ev = JSON.parse(message.data);
      if (document.getElementById("ev-" + ev.id)) { return; }
      var wrap = rows.closest(".table-wrap");
      if (wrap) { wrap.hidden = false; }
      var empty = document.getElementById("live-empty");
      if (empty) { empty.hidden = true; }
      rows.insertBefore(row(ev), rows.firstChild);
    };
    button.setAttribute("aria-pressed", "true");
    button.textContent = "Stop following";
  }
  function stop() {
    if (source) { source.close(); source = null; }
    button.setAttribute("aria-pressed", "false");
    button.textContent = "Follow live";
    say("Stopped following.");
  }
  button.addEventListener("click", function () { if (source) { stop(); } else { start(); } });
})();
