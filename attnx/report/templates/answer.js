// attnx answer view: a language model's prompt and answer as tokens. Pointing at an answer token
// (or clicking it, to keep it) colours the context before it by its relevance for that token, each
// row scaled by its largest |value| outside the sinks (first and special tokens, which are hatched
// and left out of the scale unless the box is ticked), on the diverging colour map of the PNG view.
// "whole answer" shows the prompt's relevance for the answer's summed log-probability.

function attnxView(root) {
  const D = JSON.parse(root.querySelector("script.attnx-data").textContent);
  const table = new Uint8Array(D.colormap.length / 2);
  for (let i = 0; i < table.length; i++) table[i] = parseInt(D.colormap.substr(2 * i, 2), 16);
  const T0 = D.prompt_length, N = D.tokens.length;
  const state = {method: D.methods[0], sinks: D.include_sinks, pinned: null, hover: null, point: null};

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return "n/a";
    const a = Math.abs(v);
    return (v >= 0 ? "+" : "-") + (a >= 1e-3 && a < 1e4 ? a.toPrecision(3) : a.toExponential(2));
  }
  function pct(v) { return (100 * v).toFixed(0) + " %"; }
  // the colour matplotlib gives x in [0, 1] (entry floor(x * 256), as imshow with vmin=-1, vmax=1)
  function colour(v) {
    const k = Math.max(0, Math.min(255, Math.floor((Math.max(-1, Math.min(1, v)) + 1) / 2 * 256)));
    return "rgb(" + table[3 * k] + ", " + table[3 * k + 1] + ", " + table[3 * k + 2] + ")";
  }

  root.appendChild(el("div", "ax-header")).append(el("span", "ax-title", D.title), el("span", "ax-sub", D.subtitle));
  const controls = root.appendChild(el("div", "ax-controls"));
  const method = el("select", "ax-method");
  for (const m of D.methods) { const o = el("option", null, m); o.value = m; method.appendChild(o); }
  const sinkBox = el("input", "ax-include-sinks");
  sinkBox.type = "checkbox";
  sinkBox.checked = state.sinks;
  const l1 = el("label", null, "method "), l2 = el("label", null, "first and special tokens in the colour scale ");
  l1.appendChild(method);
  l2.appendChild(sinkBox);
  const whole = el("button", "ax-whole", "whole answer");
  whole.type = "button";
  controls.append(l1, l2, whole);
  method.addEventListener("change", () => { state.method = method.value; draw(); });
  sinkBox.addEventListener("change", () => { state.sinks = sinkBox.checked; draw(); });

  const text = root.appendChild(el("div", "ax-answer-text"));
  const spans = [];
  for (let j = 0; j < N; j++) {
    if (j === T0) text.appendChild(el("span", "ax-turn", "answer:"));
    const shown = D.tokens[j].replace(/\n/g, "↵");
    const s = el("span", "ax-tok" + (j >= T0 ? " ax-gen" : "") + (D.sinks[j] ? " ax-sink" : ""), shown);
    s.dataset.j = String(j);
    text.appendChild(s);
    spans.push(s);
    if (D.tokens[j].endsWith("\n")) text.appendChild(el("br"));
  }
  const info = root.appendChild(el("div", "ax-readout"));
  const point = root.appendChild(el("div", "ax-readout ax-point"));
  root.appendChild(el("div", "ax-legend",
    "red: for the answer token, blue: against it; each token's row scaled by its largest |relevance| " +
    "(hatched: first and special tokens, outside the scale unless ticked); point at an answer token, click to keep it"));

  // the selected row: an answer token k (0..G-1), "span" (the whole answer), or null
  function selected() { return state.hover !== null ? state.hover : state.pinned; }
  function rowOf(sel) {
    const E = D.entries[state.method];
    if (sel === "span") return E.span ? {values: E.span, length: T0} : null;
    return {values: E.rows[sel], length: T0 + sel};
  }
  function scaleOf(values, length) {
    let m = 0;
    for (let j = 0; j < length; j++) if (values[j] !== null && (state.sinks || !D.sinks[j])) m = Math.max(m, Math.abs(values[j]));
    return m;
  }

  function draw() {
    const sel = selected(), E = D.entries[state.method];
    whole.disabled = !E.span;
    const row = sel === null ? null : rowOf(sel);
    const scale = row ? scaleOf(row.values, row.length) : 0;
    for (let j = 0; j < N; j++) {
      const s = spans[j];
      s.classList.remove("ax-on", "ax-strong", "ax-unseen");
      s.style.background = "";
      s.dataset.value = "";
      if (!row) continue;
      if (j >= row.length) { s.classList.add("ax-unseen"); continue; }
      const v = row.values[j];
      s.dataset.value = String(v);
      if (D.sinks[j] && !state.sinks) continue;  // hatched by its class
      const x = scale > 0 ? v / scale : 0;
      s.style.background = colour(x);
      if (Math.abs(x) > 0.6) s.classList.add("ax-strong");
    }
    if (typeof sel === "number") spans[T0 + sel].classList.add("ax-on");
    whole.classList.toggle("ax-on", sel === "span");
    if (sel === null) info.textContent = "point at an answer token";
    else if (sel === "span") info.textContent = "whole answer " + JSON.stringify(D.answer) + ": log p = " +
      E.span_log_probability.toFixed(3) + "; prompt tokens coloured by their relevance for it";
    else info.textContent = JSON.stringify(D.tokens[T0 + sel]) + " (p = " + D.probabilities[sel].toFixed(3) + "): " +
      "first and special tokens hold " + pct(E.sink_share[sel]) + " of |relevance|" +
      (state.sinks ? "" : " (not in the colour scale)") + "; scale ±" + fmt(scale).slice(1);
    if (state.point === null || !row || state.point >= row.length) point.textContent = "\u00a0";
    else point.textContent = JSON.stringify(D.tokens[state.point]) + " at " + state.point + ": " +
      fmt(row.values[state.point]) + (scale > 0 ? " (" + (row.values[state.point] / scale).toFixed(2) + " of the scale)" : "");
    root.dataset.drawn = String(parseInt(root.dataset.drawn || "0", 10) + 1);
  }

  text.addEventListener("mouseover", ev => {
    const t = ev.target.closest(".ax-tok");
    if (!t) return;
    const j = parseInt(t.dataset.j, 10);
    state.point = j;
    if (j >= T0) state.hover = j - T0;
    draw();
  });
  text.addEventListener("mouseleave", () => { state.hover = null; state.point = null; draw(); });
  text.addEventListener("click", ev => {
    const t = ev.target.closest(".ax-tok.ax-gen");
    if (!t) return;
    const k = parseInt(t.dataset.j, 10) - T0;
    state.pinned = state.pinned === k ? null : k;
    draw();
  });
  whole.addEventListener("click", () => { state.pinned = state.pinned === "span" ? null : "span"; state.hover = null; draw(); });
  state.pinned = D.initial;
  draw();
  root.dataset.ready = "true";
}
