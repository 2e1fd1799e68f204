// A small hand-written SVG line chart of per-epoch metrics (metrics.json's "epochs" list):
// one panel each for the losses, the accuracies and the rest (learning rate...), so series of
// different scales do not flatten each other.
"use strict";
window.cubeChart = {
  colors: ["#2f5fd0", "#c23b3b", "#1f8a4c", "#b7791f", "#7b3fc4", "#10879b"],
  draw() {
    const holder = document.getElementById("chart");
    const data = document.getElementById("metrics-data");
    if (!holder || !data) return;
    const metrics = JSON.parse(data.textContent);
    const kind = (s) => (s.includes("loss") ? 0 : s.includes("acc") ? 1 : 2);
    const groups = [0, 1, 2].map((k) => metrics.series.filter((s) => kind(s) === k));
    holder.innerHTML = "";
    groups.forEach((names) => { if (names.length) holder.append(this.panel(metrics.epochs, names)); });
  },
  panel(epochs, names) {
    const W = 360, H = 220, L = 48, R = 10, T = 10, B = 30;
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H + 24}`);
    svg.setAttribute("width", W);
    svg.classList.add("panel");
    const xs = epochs.map((e, i) => e.epoch ?? i + 1);
    const vals = names.flatMap((n) => epochs.map((e) => e[n]).filter((v) => typeof v === "number"));
    let lo = Math.min(...vals), hi = Math.max(...vals);
    if (lo === hi) { lo -= 0.5; hi += 0.5; }
    const x0 = Math.min(...xs), x1 = Math.max(...xs) === x0 ? x0 + 1 : Math.max(...xs);
    const px = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
    const py = (y) => T + (1 - (y - lo) / (hi - lo)) * (H - T - B);
    const add = (tag, attrs, text) => {
      const el = document.createElementNS(ns, tag);
      Object.entries(attrs).forEach(([k, v]) => el.setAttribute(k, v));
      if (text !== undefined) el.textContent = text;
      svg.append(el);
      return el;
    };
    add("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999"});
    add("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#999"});
    [lo, (lo + hi) / 2, hi].forEach((v) => add("text", {x: L - 4, y: py(v) + 4, "text-anchor": "end", "font-size": 10}, +v.toPrecision(3)));
    [...new Set(xs)].forEach((x) => add("text", {x: px(x), y: H - B + 14, "text-anchor": "middle", "font-size": 10}, x));
    add("text", {x: (W + L) / 2, y: H - 2, "text-anchor": "middle", "font-size": 11}, "epoch");
    names.forEach((name, i) => {
      const color = this.colors[i % this.colors.length];
      const pts = epochs.map((e, j) => [xs[j], e[name]]).filter((p) => typeof p[1] === "number");
      add("polyline", {points: pts.map(([x, y]) => `${px(x)},${py(y)}`).join(" "), fill: "none", stroke: color, "stroke-width": 2});
      pts.forEach(([x, y]) => add("circle", {cx: px(x), cy: py(y), r: 3, fill: color}).append(
        Object.assign(document.createElementNS(ns, "title"), {textContent: `${name} epoch ${x}: ${y}`})));
      add("text", {x: L + i * 120, y: H + 18, fill: color, "font-size": 11, "data-series": name}, name);
    });
    return svg;
  },
};
