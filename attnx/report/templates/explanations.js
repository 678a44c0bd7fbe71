// attnx explanation view. The data (JSON, in the fragment) holds every method x target that was
// explained: patch scores (maps are drawn here: bilinear upsampling as torch's interpolate with
// align_corners=False, then min-max per map, as Explanation.heatmap), quantised pixel maps for
// pixel-level methods, or token scores for text. Nothing is fetched.

function attnxView(root) {
  const D = JSON.parse(root.querySelector("script.attnx-data").textContent);
  if (D.kind === "text") textView(root, D);
  else imageView(root, D);
}

// ------------------------------------------------------------------------------------------ helpers
function el(tag, attrs, children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "text") e.textContent = v;
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children || []) if (c) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
  return e;
}

function dropdown(cls, options, value) {
  const s = el("select", {class: cls});
  for (const [v, text] of options) s.appendChild(el("option", {value: v, text: text}));
  s.value = value;
  return s;
}

function labelled(text, control, key) {
  return el("label", {}, [key ? el("span", {class: "ax-key " + key}) : null, text, control]);
}

// The target and the two compared methods, shared by the image and the text views: the three
// dropdowns, wired to state[key] and a redraw, and their labels in the order the views show them.
function comparisonControls(D, state, draw) {
  const methodOptions = D.methods.map(m => [m, m]);
  const c = {
    target: dropdown("ax-target", D.targets.map(t => [t, t]), state.target),
    a: dropdown("ax-method-a", methodOptions, state.a),
    b: dropdown("ax-method-b", [["", "(none)"]].concat(methodOptions), state.b),
  };
  for (const key of ["target", "a", "b"]) c[key].addEventListener("change", () => { state[key] = c[key].value; draw(); });
  return {...c, labels: [labelled("target", c.target), labelled("method A", c.a, "ax-key-a"),
                         labelled("method B", c.b, "ax-key-b")]};
}

// a number as the read-outs show it: 4 significant digits, an explicit sign
function fmt(v) {
  if (v === null || v === undefined || !isFinite(v)) return "n/a";
  if (v === 0) return "0";
  const a = Math.abs(v);
  return (v > 0 ? "+" : "-") + (a >= 1e-3 && a < 1e4 ? a.toPrecision(4) : a.toExponential(3));
}

function bytes(b64) {
  const s = atob(b64), a = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) a[i] = s.charCodeAt(i);
  return a;
}

function hexBytes(hex) {
  const a = new Uint8Array(hex.length / 2);
  for (let i = 0; i < a.length; i++) a[i] = parseInt(hex.substr(2 * i, 2), 16);
  return a;
}

function header(root, D) {
  root.appendChild(el("div", {class: "ax-header"}, [
    el("div", {class: "ax-title", text: D.title}), D.subtitle ? el("div", {class: "ax-sub", text: D.subtitle}) : null]));
}

// (h, w) patch scores -> (H, W) map: torch.nn.functional.interpolate(mode="bilinear", align_corners=False)
function upsample(scores, h, w, H, W) {
  function axis(n, N) {
    const i0 = new Int32Array(N), i1 = new Int32Array(N), l1 = new Float64Array(N), scale = n / N;
    for (let k = 0; k < N; k++) {
      let s = scale * (k + 0.5) - 0.5;
      if (s < 0) s = 0;
      const i = Math.floor(s);
      i0[k] = i; i1[k] = i < n - 1 ? i + 1 : i; l1[k] = Math.min(Math.max(s - i, 0), 1);
    }
    return [i0, i1, l1];
  }
  const [y0, y1, ly] = axis(h, H), [x0, x1, lx] = axis(w, W), out = new Float64Array(H * W);
  for (let Y = 0; Y < H; Y++) {
    const a = y0[Y] * w, b = y1[Y] * w, hy = ly[Y];
    for (let X = 0; X < W; X++) {
      const hx = lx[X];
      out[Y * W + X] = (1 - hy) * ((1 - hx) * scores[a + x0[X]] + hx * scores[a + x1[X]]) +
                       hy * ((1 - hx) * scores[b + x0[X]] + hx * scores[b + x1[X]]);
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------------ images
function imageView(root, D) {
  const [H, W] = D.size, [h, w] = D.grid, luts = {}, cache = {}, pixels = D.samples.map(() => null);
  for (const [k, v] of Object.entries(D.colormaps)) luts[k] = hexBytes(v);
  const state = {sample: 0, target: D.targets[0], a: D.a, b: D.b,
                 opacity: D.opacity, cmap: D.cmap, hover: null};
  const entry = (method, target) => (D.entries[method] || {})[target === undefined ? state.target : target];

  // the drawn map of (method, target, sample): colour-table indices, and values in [-1, 1]: relevance
  // over the 99th percentile of its |value| (s.scale), zero mid-scale whatever the sign, as in the PNGs
  function heat(method, target, sample) {
    const key = method + "\u0000" + target + "\u0000" + sample;
    if (cache[key]) return cache[key];
    const s = entry(method, target)[sample], n = H * W, idx = new Uint8Array(n);
    let v;
    if (s.pixels) {  // pixel-level methods: quantised in Python, index = floor((value + 1) * 128)
      const q = bytes(s.pixels);
      v = new Float64Array(n);
      for (let p = 0; p < n; p++) { idx[p] = q[p]; v[p] = (q[p] + 0.5) / 128 - 1; }
    } else {
      v = upsample(s.scores, h, w, H, W);
      for (let p = 0; p < n; p++) {
        v[p] = s.scale > 0 ? Math.min(1, Math.max(-1, v[p] / s.scale)) : 0;
        idx[p] = Math.min(255, Math.floor((v[p] + 1) * 128));
      }
    }
    return (cache[key] = {idx: idx, v: v});
  }

  // image (grey under a map, or white) blended with the colour-mapped heat map, pixel by pixel
  function paint(canvas, map, image) {
    const ctx = canvas.getContext("2d"), out = ctx.createImageData(W, H), o = out.data, lut = luts[state.cmap];
    const a = map ? state.opacity : 0;
    for (let p = 0, n = W * H; p < n; p++) {
      const q = 4 * p, k = map ? 3 * map.idx[p] : 0;
      // under a map the image is grey (as in the PNGs): its own colours do not mix with the map's
      const grey = image && map ? 0.299 * image[q] + 0.587 * image[q + 1] + 0.114 * image[q + 2] : null;
      for (let c = 0; c < 3; c++) {
        const base = grey !== null ? grey : image ? image[q + c] : 255;
        o[q + c] = (1 - a) * base + a * (map ? lut[k + c] : 0);
      }
      o[q + 3] = 255;
    }
    ctx.putImageData(out, 0, 0);
  }

  header(root, D);
  const controls = {
    ...comparisonControls(D, state, draw),
    opacity: el("input", {class: "ax-opacity", type: "range", min: "0", max: "1", step: "0.05", value: String(state.opacity)}),
    cmap: dropdown("ax-cmap", Object.keys(D.colormaps).map(c => [c, c]), state.cmap),
  };
  const opacityText = el("span", {class: "ax-opacity-value", text: state.opacity.toFixed(2)});
  root.appendChild(el("div", {class: "ax-controls"}, [
    ...controls.labels, labelled("opacity", controls.opacity), opacityText,
    labelled("colour map", controls.cmap)]));

  // the samples, as a list of thumbnails
  const list = el("div", {class: "ax-samples"});
  const sampleButtons = D.samples.map((s, i) => {
    const b = el("button", {class: "ax-sample", type: "button", "data-index": String(i), title: s.name},
                 [s.image ? el("img", {src: s.image, alt: ""}) : null, el("span", {text: s.name})]);
    b.addEventListener("click", () => { state.sample = i; draw(); });
    list.appendChild(b);
    return b;
  });
  if (D.samples.length < 2) list.style.display = "none";

  // two panels: methods A and B on the same sample and target
  const side = Math.min(360, Math.round(360 * Math.min(1, W / H))), tall = Math.round(side * H / W);
  function panel(slot) {
    const map = el("canvas", {class: "ax-map", width: String(W), height: String(H)});
    const cursor = el("canvas", {class: "ax-cursor"});
    const stage = el("div", {class: "ax-stage"}, [map, cursor]);
    stage.style.width = side + "px"; stage.style.height = tall + "px";
    if (side / W >= 2) map.classList.add("ax-pixelated");
    const p = {slot: slot, map: map, cursor: cursor, stage: stage,
               title: el("span", {class: "ax-method"}), label: el("div", {class: "ax-plabel"}),
               readout: el("div", {class: "ax-readout ax-hint"}), note: el("div", {class: "ax-note"})};
    p.root = el("div", {class: "ax-panel", "data-slot": slot}, [
      el("div", {class: "ax-ptitle"}, [el("span", {class: "ax-key ax-key-" + slot}), p.title]), p.label, stage, p.readout, p.note]);
    stage.addEventListener("mousemove", ev => {
      const r = stage.getBoundingClientRect();
      const fx = Math.min(Math.max((ev.clientX - r.left) / r.width, 0), 0.999999);
      const fy = Math.min(Math.max((ev.clientY - r.top) / r.height, 0), 0.999999);
      state.hover = {x: Math.floor(fx * W), y: Math.floor(fy * H), r: Math.floor(fy * h), c: Math.floor(fx * w)};
      hover();
    });
    stage.addEventListener("mouseleave", () => { state.hover = null; hover(); });
    return p;
  }
  const panels = [panel("a"), panel("b")];

  // the colour scale
  const bar = el("canvas", {width: "256", height: "1"});
  const scale = el("div", {class: "ax-scale"}, ["\u22121", bar, "1", el("span", {
    text: "relevance over the 99th percentile of its |value|: zero mid-scale in every map, negative below; " +
          "the read-out gives the patch's score as the method returns it"})]);

  // every method at a glance: click for A, shift-click for B
  const strip = el("div", {class: "ax-strip"});
  root.appendChild(el("div", {class: "ax-main"}, [
    list, el("div", {class: "ax-centre"}, [el("div", {class: "ax-panels"}, panels.map(p => p.root)), scale]),
    el("div", {class: "ax-overview"}, [
      el("div", {class: "ax-strip-title", text: "every method (click: A, shift-click: B)"}), strip])]));
  const thumbs = D.methods.map(m => {
    const c = el("canvas", {width: String(W), height: String(H)});
    if (80 / W >= 2) c.classList.add("ax-pixelated");
    const t = el("button", {class: "ax-thumb", type: "button", "data-method": m, title: m}, [c, el("span", {text: m.replace(/_/g, "_\u200b")})]);
    t.addEventListener("click", ev => { if (ev.shiftKey) state.b = m; else state.a = m; draw(); });
    strip.appendChild(t);
    return {method: m, root: t, canvas: c};
  });

  controls.cmap.addEventListener("change", () => { state.cmap = controls.cmap.value; draw(); });
  controls.opacity.addEventListener("input", () => {
    state.opacity = parseFloat(controls.opacity.value); opacityText.textContent = state.opacity.toFixed(2); draw();
  });

  function drawPanel(p, method) {
    p.root.classList.toggle("ax-off", !method);
    if (!method) return;
    const e = entry(method);
    Object.assign(p.root.dataset, {method: method, target: state.target, sample: String(state.sample)});
    p.title.textContent = method;
    p.label.textContent = e ? e[state.sample].label : "not computed for this target";
    p.note.textContent = e ? e[state.sample].note || "" : "";
    paint(p.map, e ? heat(method, state.target, state.sample) : null, pixels[state.sample]);
  }

  function readout(p, method) {
    const ctx = p.cursor.getContext("2d"), dpr = window.devicePixelRatio || 1, e = method && entry(method);
    p.cursor.width = Math.round(side * dpr); p.cursor.height = Math.round(tall * dpr);
    ctx.clearRect(0, 0, p.cursor.width, p.cursor.height);
    const hv = state.hover;
    if (!hv || !e) {
      p.readout.textContent = e ? "point at the map to read the values" : "";
      p.readout.classList.add("ax-hint");
      delete p.readout.dataset.value;
      return;
    }
    const s = e[state.sample], k = hv.r * w + hv.c, value = s.scores[k];
    const m = heat(method, state.target, state.sample).v[hv.y * W + hv.x];
    p.readout.classList.remove("ax-hint");
    p.readout.textContent = `patch (${hv.r}, ${hv.c}) \u00b7 score ${fmt(value)} \u00b7 map ${m.toFixed(2)}`;
    Object.assign(p.readout.dataset, {row: String(hv.r), col: String(hv.c), value: String(value)});
    const cw = p.cursor.width / w, ch = p.cursor.height / h;
    ctx.lineWidth = 3 * dpr; ctx.strokeStyle = "rgba(0,0,0,0.55)";
    ctx.strokeRect(hv.c * cw, hv.r * ch, cw, ch);
    ctx.lineWidth = 1.5 * dpr; ctx.strokeStyle = "#fff";
    ctx.strokeRect(hv.c * cw, hv.r * ch, cw, ch);
  }

  function hover() { panels.forEach((p, i) => readout(p, i === 0 ? state.a : state.b)); }

  function draw() {
    controls.target.value = state.target; controls.a.value = state.a; controls.b.value = state.b;
    sampleButtons.forEach((b, i) => b.classList.toggle("ax-on", i === state.sample));
    drawPanel(panels[0], state.a);
    drawPanel(panels[1], state.b);
    for (const t of thumbs) {
      const e = entry(t.method);
      paint(t.canvas, e ? heat(t.method, state.target, state.sample) : null, pixels[state.sample]);
      t.root.classList.toggle("ax-is-a", t.method === state.a);
      t.root.classList.toggle("ax-is-b", t.method === state.b);
    }
    const bctx = bar.getContext("2d"), img = bctx.createImageData(256, 1), lut = luts[state.cmap];
    for (let k = 0; k < 256; k++) { for (let c = 0; c < 3; c++) img.data[4 * k + c] = lut[3 * k + c]; img.data[4 * k + 3] = 255; }
    bctx.putImageData(img, 0, 0);
    hover();
    root.dataset.drawn = String((parseInt(root.dataset.drawn || "0", 10) + 1));
  }

  draw();
  // the images: decoded, then read back as pixels to blend with the maps
  Promise.all(D.samples.map((s, i) => !s.image ? null : new Promise(resolve => {
    const im = new Image();
    im.onload = () => {
      const c = el("canvas", {width: String(W), height: String(H)}), ctx = c.getContext("2d");
      ctx.drawImage(im, 0, 0, W, H);
      pixels[i] = ctx.getImageData(0, 0, W, H).data;
      resolve();
    };
    im.onerror = () => { console.error("attnx: image " + i + " could not be decoded"); resolve(); };
    im.src = s.image;
  }))).then(() => { draw(); root.dataset.ready = "true"; });
}

// ------------------------------------------------------------------------------------------ text
function textView(root, D) {
  const palettes = {"green / red": [[0, 160, 0], [220, 0, 0]], "blue / orange": [[0, 114, 178], [213, 94, 0]]};
  const state = {target: D.targets[0], a: D.a, b: D.b,
                 palette: Object.keys(palettes)[0], intensity: D.intensity, hover: null};
  const entry = method => (D.entries[method] || {})[state.target];

  header(root, D);
  const controls = {
    ...comparisonControls(D, state, draw),
    intensity: el("input", {class: "ax-opacity", type: "range", min: "0.1", max: "1", step: "0.05", value: String(state.intensity)}),
    palette: dropdown("ax-cmap", Object.keys(palettes).map(p => [p, p]), state.palette),
  };
  root.appendChild(el("div", {class: "ax-controls"}, [
    ...controls.labels, labelled("colour strength", controls.intensity),
    labelled("colours (for / against)", controls.palette)]));
  const where = el("span", {class: "ax-where", text: "point at a word piece to read its relevance"});
  const values = {a: el("span", {class: "ax-value", "data-slot": "a"}), b: el("span", {class: "ax-value", "data-slot": "b"})};
  root.appendChild(el("div", {class: "ax-bar"}, [where, values.a, values.b]));
  const table = el("table", {class: "ax-text"});
  root.appendChild(table);
  const legend = el("div", {class: "ax-legend"});
  root.appendChild(legend);

  function colour(v) {
    const [pos, neg] = palettes[state.palette], c = v >= 0 ? pos : neg, a = Math.min(Math.abs(v), 1) * state.intensity;
    return `rgba(${c[0]},${c[1]},${c[2]},${a.toFixed(3)})`;
  }

  function cell(slot, method, i) {
    const td = el("td", {class: "ax-cell", "data-slot": slot});
    const e = method && entry(method);
    if (!e) { td.textContent = method ? "not computed for this target" : ""; return td; }
    const s = e[i], sentence = D.sentences[i];
    sentence.tokens.forEach((tok, t) => {
      const v = s.scale > 0 ? s.scores[t] / s.scale : 0;
      const span = el("span", {class: "ax-tok", text: tok, "data-s": String(i), "data-t": String(t)});
      if (sentence.joined[t]) span.classList.add("ax-joined");
      if (sentence.special[t]) span.classList.add("ax-special");
      if (t === sentence.readout) { span.classList.add("ax-explained"); span.title = "the explained token: its row is read"; }
      span.style.background = colour(v);
      if (Math.min(Math.abs(v), 1) * state.intensity > 0.6) span.classList.add("ax-strong");
      if (Math.abs(v) > 1) span.title = (span.title ? span.title + "; " : "") + "beyond the colour scale";
      td.appendChild(span);
    });
    return td;
  }

  function show() {
    const hv = state.hover;
    for (const t of table.querySelectorAll(".ax-hover")) t.classList.remove("ax-hover");
    for (const slot of ["a", "b"]) { values[slot].textContent = ""; delete values[slot].dataset.value; }
    if (!hv) { where.textContent = "point at a word piece to read its relevance"; return; }
    const sentence = D.sentences[hv.s];
    where.textContent = `sentence ${hv.s + 1}, token ${hv.t} "${sentence.tokens[hv.t]}"` +
                        (hv.t === sentence.readout ? " (the explained token)" : "");
    for (const t of table.querySelectorAll(`.ax-tok[data-s="${hv.s}"][data-t="${hv.t}"]`)) t.classList.add("ax-hover");
    for (const slot of ["a", "b"]) {
      const method = state[slot], e = method && entry(method);
      if (!e) continue;
      const s = e[hv.s], value = s.scores[hv.t];
      values[slot].textContent = `${slot.toUpperCase()} ${method}: ${fmt(value)} (${fmt(s.scale > 0 ? value / s.scale : 0)} of the largest)`;
      values[slot].dataset.value = String(value);
    }
  }

  function draw() {
    controls.target.value = state.target; controls.a.value = state.a; controls.b.value = state.b;
    table.textContent = "";
    const head = el("tr", {}, [el("th", {class: "ax-lab", text: "explained class"}),
                               el("th", {class: "ax-col-a", text: "A: " + state.a})]);
    if (state.b) head.appendChild(el("th", {class: "ax-col-b", text: "B: " + state.b}));
    table.appendChild(el("thead", {}, [head]));
    const body = el("tbody");
    const first = entry(state.a) || (state.b && entry(state.b));
    D.sentences.forEach((sentence, i) => {
      const row = el("tr", {"data-sentence": String(i)}, [el("td", {class: "ax-lab", text: first ? first[i].label : ""})]);
      row.appendChild(cell("a", state.a, i));
      if (state.b) row.appendChild(cell("b", state.b, i));
      const notes = [state.a, state.b].map(m => m && entry(m) && entry(m)[i].note).filter(Boolean);
      if (notes.length) row.firstChild.appendChild(el("div", {class: "ax-note", text: notes.join("; ")}));
      body.appendChild(row);
    });
    table.appendChild(body);
    legend.textContent = "";
    const gradient = el("span", {class: "ax-gradient"});
    gradient.style.background = `linear-gradient(to right, ${colour(-1)}, ${colour(0)}, ${colour(1)})`;
    legend.append(el("span", {}, ["against the class ", gradient, " for the class"]),
                  el("span", {text: "relevance divided by the largest |relevance| of the sentence's word pieces " +
                                    "(special tokens do not set the scale)"}));
    const marked = D.sentences.some(s => s.readout !== null);
    legend.appendChild(el("span", {}, marked ? [el("span", {class: "ax-tok ax-explained", text: "token"}),
                                                "\u2002the explained token (its row is read)"]
                                             : ["the mean of the token rows is read (no single explained token)"]));
    root.dataset.target = state.target; root.dataset.a = state.a; root.dataset.b = state.b;
    show();
    root.dataset.drawn = String((parseInt(root.dataset.drawn || "0", 10) + 1));
  }

  table.addEventListener("mouseover", ev => {
    const t = ev.target.closest(".ax-tok");
    if (!t || !t.dataset.s) return;
    state.hover = {s: parseInt(t.dataset.s, 10), t: parseInt(t.dataset.t, 10)};
    show();
  });
  table.addEventListener("mouseleave", () => { state.hover = null; show(); });
  controls.palette.addEventListener("change", () => { state.palette = controls.palette.value; draw(); });
  controls.intensity.addEventListener("input", () => { state.intensity = parseFloat(controls.intensity.value); draw(); });
  draw();
  root.dataset.ready = "true";
}
