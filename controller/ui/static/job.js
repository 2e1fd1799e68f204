// Job page: the log streams in by server-sent events (no reload); when the job ends, the live
// part (state, outputs, chart) is fetched again and swapped in.
"use strict";
(function () {
  const log = document.getElementById("log");
  const live = document.getElementById("live");
  if (!log || !live) return;
  const follow = () => {
    const nearEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    return nearEnd;
  };
  const source = new EventSource(log.dataset.src);
  source.onmessage = (ev) => {
    const stick = follow();
    log.append(document.createTextNode(JSON.parse(ev.data)));
    if (stick) log.scrollTop = log.scrollHeight;
  };
  source.addEventListener("end", async (ev) => {
    source.close();
    log.dataset.ended = JSON.parse(ev.data).state;
    if (live.dataset.final === "yes") return;
    const resp = await fetch("/jobs/" + encodeURIComponent(live.dataset.job) + "/live",
                             {credentials: "same-origin"});
    if (resp.ok) {
      live.innerHTML = await resp.text();
      live.dataset.final = "yes";
      window.cubeChart && window.cubeChart.draw();
    }
  });
  window.cubeChart && window.cubeChart.draw();
})();
