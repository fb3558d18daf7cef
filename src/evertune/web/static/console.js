// Evertune console: progressive enhancement only; every page reads fine without it.
//  - Elements with an id and `data-live` are refreshed every few seconds from a fresh copy of
//    the same page (server-rendered), until the new copy no longer marks them live.
//  - Forms with `data-busy="text"` disable their button and show the text while they submit
//    (approving runs the QA system tests, which takes a while).
"use strict";

function refreshLive() {
  const live = document.querySelectorAll("[data-live][id]");
  if (!live.length) return;
  fetch(window.location.href, { credentials: "same-origin", headers: { "x-evertune-live": "1" } })
    .then((r) => (r.ok ? r.text() : Promise.reject(r.status)))
    .then((html) => {
      const fresh = new DOMParser().parseFromString(html, "text/html");
      let still = 0;
      live.forEach((el) => {
        const next = fresh.getElementById(el.id);
        if (!next) return;
        el.replaceWith(next);
        if (next.hasAttribute("data-live")) still += 1;
      });
      if (still) window.setTimeout(refreshLive, 2000);
    })
    .catch(() => window.setTimeout(refreshLive, 5000));
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.querySelector("[data-live][id]")) window.setTimeout(refreshLive, 2000);
  document.querySelectorAll("form[data-busy]").forEach((form) => {
    form.addEventListener("submit", () => {
      const button = form.querySelector("button[type=submit]");
      if (button) {
        button.disabled = true;
        button.textContent = form.getAttribute("data-busy");
      }
    });
  });
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.getAttribute("data-confirm"))) event.preventDefault();
    });
  });
});
