// Try page: draw on the canvas or pick an image; the server answers with the digit, the ten
// probabilities and the 28x28 pixels the model saw (cube serve's own preprocessing).
"use strict";
(function () {
  const area = document.getElementById("try-area");
  const pad = document.getElementById("pad");
  const ctx = pad.getContext("2d");
  const clear = () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, pad.width, pad.height); };
  clear();
  let drawing = false;
  const at = (ev) => { const r = pad.getBoundingClientRect(); return [ev.clientX - r.left, ev.clientY - r.top]; };
  pad.addEventListener("pointerdown", (ev) => { drawing = true; ctx.beginPath(); ctx.moveTo(...at(ev)); });
  pad.addEventListener("pointermove", (ev) => {
    if (!drawing) return;
    ctx.lineTo(...at(ev)); ctx.strokeStyle = "#fff"; ctx.lineWidth = 20; ctx.lineCap = "round";
    ctx.lineJoin = "round"; ctx.stroke();
  });
  ["pointerup", "pointerleave"].forEach((t) => pad.addEventListener(t, () => { drawing = false; }));
  document.getElementById("clear").addEventListener("click", clear);

  const show = (answer) => {
    document.getElementById("digit").textContent = answer.digit;
    const table = document.getElementById("probs");
    table.innerHTML = "";
    answer.probabilities.forEach((p, d) => {
      const row = table.insertRow();
      row.dataset.digit = d;
      row.insertCell().textContent = d;
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = Math.round(p * 200) + "px";
      row.insertCell().append(bar);
      row.insertCell().textContent = (p * 100).toFixed(1) + "%";
    });
    const seen = document.getElementById("seen").getContext("2d");
    const img = seen.createImageData(28, 28);
    answer.pixels.flat().forEach((v, i) => { img.data.set([v, v, v, 255], i * 4); });
    const tmp = document.createElement("canvas");
    tmp.width = tmp.height = 28;
    tmp.getContext("2d").putImageData(img, 0, 0);
    seen.imageSmoothingEnabled = false;
    seen.drawImage(tmp, 0, 0, 112, 112);
  };
  const send = async (blob, name) => {
    const err = document.getElementById("try-error");
    err.hidden = true;
    document.getElementById("digit").textContent = "…";
    const body = new FormData();
    body.append("file", blob, name);
    const resp = await fetch(area.dataset.url, {method: "POST", body, credentials: "same-origin",
                                                headers: {"X-CSRF-Token": cube.csrf}});
    const answer = await resp.json();
    if (!resp.ok) { err.textContent = answer.detail; err.hidden = false; document.getElementById("digit").textContent = "–"; return; }
    show(answer);
  };
  document.getElementById("predict-drawing").addEventListener("click", () => pad.toBlob((b) => send(b, "drawing.png"), "image/png"));
  document.getElementById("predict-image").addEventListener("click", () => {
    const file = document.getElementById("image").files[0];
    if (file) send(file, file.name);
  });
})();
