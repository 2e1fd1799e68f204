// cube ui: small helpers shared by every page (no framework, no build step).
"use strict";
const cube = {
  csrf: document.querySelector('meta[name="csrf-token"]').content,
  // Re-fetch an HTML fragment into an element every few seconds (the hosts table).
  refresh(el, ms) {
    setInterval(async () => {
      const resp = await fetch(el.dataset.refresh, {credentials: "same-origin"});
      if (resp.ok) el.innerHTML = await resp.text();
    }, ms);
  },
};

// Hosts page: the fleet table is probed in the background; re-read it.
const hostsTable = document.getElementById("hosts-table");
if (hostsTable) cube.refresh(hostsTable, 3000);

// Submit page: show the fields of the chosen cube source only.
const submitForm = document.getElementById("submit-form");
if (submitForm) {
  const show = () => {
    const chosen = submitForm.querySelector('input[name="source"]:checked').value;
    submitForm.querySelectorAll(".source").forEach((div) => {
      div.hidden = div.dataset.source !== chosen;
    });
  };
  submitForm.querySelectorAll('input[name="source"]').forEach((r) => r.addEventListener("change", show));
  show();
}

// Submission page: follow the background submission; open the job once it runs.
const messages = document.getElementById("messages");
if (messages && messages.dataset.state) {
  const poll = async () => {
    const resp = await fetch(messages.dataset.state, {credentials: "same-origin"});
    if (!resp.ok) return setTimeout(poll, 1000);
    const sub = await resp.json();
    messages.textContent = sub.messages.join("\n");
    if (sub.error) {
      const err = document.getElementById("sub-error");
      err.textContent = sub.error;
      err.hidden = false;
      return;
    }
    if (sub.done && sub.job_id) { window.location = "/jobs/" + encodeURIComponent(sub.job_id); return; }
    setTimeout(poll, 500);
  };
  poll();
}
