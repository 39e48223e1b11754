// fedimg dashboard: live progress of running jobs (polling the JSON API) and copy buttons.
(function () {
  "use strict";
  var body = document.body;
  var root = body.dataset.root || "";
  var pollMs = Math.max(250, parseFloat(body.dataset.poll || "2") * 1000);
  var MIB = 1024 * 1024;

  function size(n) {
    if (n === null || n === undefined) return "?";
    return n >= 1024 * MIB ? (n / (1024 * MIB)).toFixed(2) + " GiB" : (n / MIB).toFixed(1) + " MiB";
  }
  function duration(s) {
    if (s === null || s === undefined) return "";
    if (s < 10) return s.toFixed(1) + "s";
    var whole = Math.round(s), h = Math.floor(whole / 3600), m = Math.floor((whole % 3600) / 60), sec = whole % 60;
    var two = function (x) { return (x < 10 ? "0" : "") + x; };
    if (h) return h + "h " + two(m) + "m";
    if (m) return m + "m " + two(sec) + "s";
    return sec + "s";
  }
  function when(iso) {
    return iso ? new Date(iso).toISOString().slice(0, 19).replace("T", " ") + "Z" : "";
  }
  function badge(value, kind) {
    var span = document.createElement("span");
    span.className = "badge " + (kind || "status") + "-" + value;
    span.textContent = value;
    return span;
  }
  function applyBars(scope) {
    scope.querySelectorAll("[data-left]").forEach(function (el) { el.style.marginLeft = el.dataset.left + "%"; });
    scope.querySelectorAll("[data-width]").forEach(function (el) { el.style.width = el.dataset.width + "%"; });
  }
  function field(el, name) { return el.querySelectorAll('[data-field="' + name + '"]'); }

  function showProgress(el, p) {
    var has = p && Object.keys(p).length > 0;
    field(el, "progress-section").forEach(function (s) { s.hidden = !has; });
    field(el, "progress").forEach(function (box) { box.hidden = !has; });
    if (!has) return;
    var done = p.done || 0, total = p.total;
    var pct = total ? Math.min(100, 100 * done / total) : null;
    field(el, "progress-bar").forEach(function (bar) {
      if (pct === null) bar.removeAttribute("value"); else bar.value = pct;
    });
    field(el, "progress-pct").forEach(function (t) { t.textContent = pct === null ? "" : pct.toFixed(0) + "%"; });
    var parts = [total ? size(done) + " of " + size(total) : size(done)];
    if (p.rate) parts.push(size(p.rate) + "/s");
    if (p.eta !== null && p.eta !== undefined && p.state !== "done") parts.push("ETA " + duration(p.eta));
    field(el, "progress-text").forEach(function (t) { t.textContent = parts.join(" · "); });
  }

  function showSteps(el, steps, seconds) {
    var tbody = field(el, "steps")[0];
    if (!tbody) return;
    var created = new Date(el.dataset.created).getTime();
    var total = Math.max(seconds, 0.001);
    tbody.textContent = "";
    steps.forEach(function (s) {
      var tr = document.createElement("tr");
      var cells = [s.name, s.region || "all", null, when(s.started_at), duration(s.seconds)];
      cells.forEach(function (text, i) {
        var td = document.createElement("td");
        if (i === 2) td.appendChild(badge(s.status)); else td.textContent = text;
        tr.appendChild(td);
      });
      var left = Math.min(100, Math.max(0, (new Date(s.started_at).getTime() - created) / 1000) / total * 100);
      var width = Math.max(0.5, Math.min(100 - left, (s.seconds || 0) / total * 100));
      var td = document.createElement("td"); td.className = "bar-col";
      var track = document.createElement("div"); track.className = "track";
      var bar = document.createElement("div"); bar.className = "bar status-" + s.status;
      bar.dataset.left = left.toFixed(2); bar.dataset.width = width.toFixed(2);
      track.appendChild(bar); td.appendChild(track); tr.appendChild(td);
      tbody.appendChild(tr);
    });
    applyBars(tbody);
  }

  function update(el, job) {
    field(el, "status").forEach(function (s) { s.textContent = ""; s.appendChild(badge(job.status)); });
    field(el, "step").forEach(function (s) { s.textContent = job.step || ""; });
    field(el, "seconds").forEach(function (s) { s.textContent = duration(job.seconds); });
    field(el, "amis").forEach(function (s) { s.textContent = String(job.ami_count); });
    showProgress(el, job.status === "running" || el.dataset.reloadOnFinish ? job.progress : null);
    showSteps(el, job.steps, job.seconds);
  }

  function poll(el) {
    var url = root + "/api/v1/jobs/" + encodeURIComponent(el.dataset.liveJob) + "/progress";
    fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (job) {
        if (!job) { setTimeout(function () { poll(el); }, pollMs); return; }
        update(el, job);
        if (job.status === "running") { setTimeout(function () { poll(el); }, pollMs); return; }
        el.dataset.finished = job.status;
        if (el.dataset.reloadOnFinish) window.location.reload();
      })
      .catch(function () { setTimeout(function () { poll(el); }, pollMs * 2); });
  }

  function copy(button) {
    var text = button.dataset.copy;
    var done = function () {
      button.textContent = "copied"; button.classList.add("done");
      setTimeout(function () { button.textContent = "copy"; button.classList.remove("done"); }, 1500);
    };
    var fallback = function () {
      var area = document.createElement("textarea");
      area.value = text; document.body.appendChild(area); area.select();
      try { document.execCommand("copy"); done(); } finally { area.remove(); }
    };
    if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).then(done, fallback);
    else fallback();
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button.copy");
    if (button) copy(button);
  });
  document.querySelectorAll("form.filters select").forEach(function (select) {
    select.addEventListener("change", function () { select.form.submit(); });
  });
  applyBars(document);
  document.querySelectorAll("[data-live-job]").forEach(function (el) {
    setTimeout(function () { poll(el); }, pollMs);
  });
})();
