// Tightrope console: keeps the status and progress of unfinished audits up to date without a
// full reload. Same-origin only (CSP script-src 'self', connect-src 'self'); no library.
"use strict";

(function () {
  const PERIOD_MS = 2000;

  function liveElements() {
    return Array.from(document.querySelectorAll("[data-audit-live]"));
  }

  function update(element, audit) {
    const status = element.querySelector("[data-field=status]");
    if (status) {
      status.textContent = audit.status;
      status.className = "badge status-" + audit.status;
    }
    const bar = element.querySelector("[data-field=progress]");
    if (bar) {
      const progress = bar.querySelector("progress");
      if (progress) {
        progress.value = audit.percent;
        progress.textContent = audit.percent + " %";
      }
      const percent = bar.querySelector("[data-field=percent]");
      if (percent) percent.textContent = audit.percent + " %";
      const message = bar.querySelector("[data-field=message]");
      if (message) message.textContent = audit.message;
      bar.hidden = audit.finished;
    }
    if (audit.finished) {
      const verdict = element.querySelector("[data-field=verdict]");
      if (verdict) {
        verdict.textContent = "";
        const badge = document.createElement("span");
        badge.className = audit.verdict ? "badge verdict-" + audit.verdict : "muted";
        badge.textContent = audit.verdict || "—";
        verdict.appendChild(badge);
      }
      element.removeAttribute("data-audit-live");
      const note = document.getElementById("live-note");
      if (note) note.textContent = "Audit " + audit.id + " has " + audit.status + ".";
    }
  }

  async function refresh() {
    const elements = liveElements();
    if (elements.length === 0) return;
    const query = elements
      .map((element) => "id=" + encodeURIComponent(element.dataset.auditLive))
      .join("&");
    try {
      const response = await fetch("/ui/progress?" + query, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
        cache: "no-store",
      });
      if (response.status === 401) {
        window.location.assign("/ui/sign-in");
        return;
      }
      if (response.ok) {
        const body = await response.json();
        for (const audit of body.audits) {
          for (const element of elements) {
            if (element.dataset.auditLive === audit.id) update(element, audit);
          }
        }
      }
    } catch (error) {
      // The service is briefly unreachable: try again at the next period.
    }
    schedule();
  }

  function schedule() {
    if (liveElements().length > 0) window.setTimeout(refresh, PERIOD_MS);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", schedule);
  } else {
    schedule();
  }
})();
