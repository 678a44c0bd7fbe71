// attnx league view: the table (click a column to sort it, best first; again to reverse), and the
// mean curves drawn as SVG from the embedded numbers. Hover a row to pick out its curves; click a
// legend entry to hide or show a method; the value under the pointer is read out under each panel.

function attnxView(root) {
  const D = JSON.parse(root.querySelector("script.attnx-data").textContent);
  const SVG = "http://www.w3.org/2000/svg";  // the SVG namespace: a name, nothing is fetched

  function el(tag, attrs, children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v; else if (k === "class") e.className = v; else e.setAttribute(k, v);
    }
    for (const c of children || []) if (c) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    return e;
  }
  function svg(tag, attrs, children) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) { if (k === "text") e.textContent = v; else e.setAttribute(k, v); }
    for (const c of children || []) if (c) e.appendChild(c);
    return e;
  }
  const shown = (v, digits) => v === null ? "\u2013" : v.toFixed(digits);
  const style = m => D.styles[m] || {color: "#888", dash: ""};

  root.appendChild(el("div", {class: "ax-header"}, [el("div", {class: "ax-title", text: D.title}),
                                                     el("div", {class: "ax-sub", text: D.subtitle})]));
  const higher = D.columns.filter(c => c.higher).map(c => c.label).join(", ");
  const lower = D.columns.filter(c => !c.higher).map(c => c.label).join(", ");
  root.appendChild(el("div", {class: "ax-sub", text: `Higher is better (\u2191): ${higher}. Lower is better (\u2193): ${lower}. ` +
    "Best values in bold. Click a column to sort it (best first; click again to reverse); hover a row to pick out its curves."}));

  // ---------------------------------------------------------------------------------- the table
  const state = {key: null, reverse: false, order: D.rows.map(r => r.method), hidden: new Set(), picked: null};
  const table = el("table", {class: "ax-league"});
  const headRow = el("tr");
  const columns = [{key: "method", label: "method", doc: "the explanation method (baselines in grey)"}].concat(D.columns);
  const sortMarks = {};
  for (const c of columns) {
    sortMarks[c.key] = el("span", {class: "ax-sort"});
    const th = el("th", {"data-key": c.key, title: c.doc || ""}, [c.label + (c.arrow ? " " + c.arrow : ""), sortMarks[c.key]]);
    th.addEventListener("click", () => sortBy(c.key));
    headRow.appendChild(th);
  }
  const body = el("tbody");
  table.append(el("thead", {}, [headRow]), body);
  root.appendChild(el("div", {class: "ax-scroll"}, [table]));
  const rows = {};
  for (const r of D.rows) {
    const sw = el("span", {class: "ax-swatch"});
    sw.style.background = style(r.method).color;
    const tr = el("tr", {"data-method": r.method, class: r.baseline ? "ax-baseline" : ""}, [el("td", {}, [sw, r.method])]);
    for (const c of D.columns) {
      const v = r.values[c.key];
      tr.appendChild(el("td", {"data-key": c.key, "data-value": v === null ? "" : String(v),
                               class: r.best.includes(c.key) ? "ax-best" : ""}, [shown(v, c.digits)]));
    }
    tr.addEventListener("mouseenter", () => pick(r.method));
    tr.addEventListener("mouseleave", () => pick(null));
    rows[r.method] = tr;
  }

  // best first: by the column's direction (nearest 0 for correlations); missing values always last
  function sortBy(key) {
    state.reverse = state.key === key ? !state.reverse : false;
    state.key = key;
    const column = D.columns.find(c => c.key === key);
    const byMethod = Object.fromEntries(D.rows.map(r => [r.method, r]));
    const value = m => byMethod[m].values[key];
    const missing = m => (column && value(m) === null ? 1 : 0);
    const cmp = (x, y) => !column ? x.localeCompare(y)
      : column.best_at_zero ? Math.abs(value(x)) - Math.abs(value(y))
      : column.higher ? value(y) - value(x) : value(x) - value(y);
    state.order = D.rows.map(r => r.method).sort((x, y) => (missing(x) - missing(y)) || (state.reverse ? -cmp(x, y) : cmp(x, y)));
    render();
  }

  function render() {
    for (const m of state.order) body.appendChild(rows[m]);
    for (const [k, mark] of Object.entries(sortMarks)) mark.textContent = k === state.key ? (state.reverse ? "\u25b2" : "\u25bc") : "";
    root.dataset.sortKey = state.key || "";
    root.dataset.order = state.order.join(",");
  }

  if (D.notes && D.notes.length) root.appendChild(el("div", {class: "ax-sub", text: D.notes.join(" ")}));

  // ---------------------------------------------------------------------------------- the curves
  function ticks(lo, hi) {
    const raw = (hi - lo) / 5, p = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map(s => s * p).find(s => s >= raw);
    const out = [];
    for (let t = Math.ceil(lo / step - 1e-9) * step; t <= hi + 1e-9; t += step) out.push(Number(t.toFixed(10)));
    return out;
  }
  const lines = [], readouts = [];
  const curves = el("div", {class: "ax-curves"});
  const Wd = 430, Ht = 260, ml = 48, mr = 12, mt = 10, mb = 36;
  for (const panel of D.panels) {
    const xs = D.fractions[panel.name];
    let lo = Infinity, hi = -Infinity;
    for (const m of D.rows.map(r => r.method)) for (const v of ((D.curves[m] || {})[panel.name] || [])) {
      if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    }
    if (!isFinite(lo)) { lo = 0; hi = 1; }
    lo = Math.floor(lo * 20) / 20; hi = Math.ceil(hi * 20) / 20;
    if (hi - lo < 0.05) hi = lo + 0.05;
    const x0 = Math.min(...xs), x1 = Math.max(...xs);
    const X = x => ml + (x - x0) / (x1 - x0 || 1) * (Wd - ml - mr);
    const Y = y => mt + (hi - y) / (hi - lo) * (Ht - mt - mb);
    const s = svg("svg", {width: String(Wd), height: String(Ht), viewBox: `0 0 ${Wd} ${Ht}`, "data-panel": panel.name});
    for (const t of ticks(lo, hi)) {
      s.append(svg("line", {x1: ml, x2: Wd - mr, y1: Y(t), y2: Y(t), stroke: "#e5e8eb"}),
               svg("text", {x: ml - 6, y: Y(t) + 3, "text-anchor": "end", text: String(t)}));
    }
    for (const t of ticks(x0, x1)) {
      s.append(svg("line", {x1: X(t), x2: X(t), y1: mt, y2: Ht - mb, stroke: "#f0f2f4"}),
               svg("text", {x: X(t), y: Ht - mb + 14, "text-anchor": "middle", text: String(t)}));
    }
    s.append(svg("rect", {x: ml, y: mt, width: Wd - ml - mr, height: Ht - mt - mb, fill: "none", stroke: "#d0d7de"}),
             svg("text", {x: (ml + Wd - mr) / 2, y: Ht - 6, "text-anchor": "middle", text: panel.xlabel}),
             svg("text", {x: 12, y: (mt + Ht - mb) / 2, "text-anchor": "middle",
                          transform: `rotate(-90 12 ${(mt + Ht - mb) / 2})`, text: panel.ylabel}));
    for (const r of D.rows) {
      const ys = (D.curves[r.method] || {})[panel.name];
      if (!ys) continue;
      const pts = xs.map((x, i) => ys[i] === null ? null : `${X(x).toFixed(1)},${Y(ys[i]).toFixed(1)}`).filter(Boolean);
      const line = svg("polyline", {points: pts.join(" "), stroke: style(r.method).color, "data-method": r.method,
                                    "stroke-dasharray": style(r.method).dash}, [svg("title", {text: r.method})]);
      line.addEventListener("mouseenter", () => pick(r.method));
      line.addEventListener("mouseleave", () => pick(null));
      s.appendChild(line);
      lines.push(line);
    }
    const guide = svg("line", {y1: mt, y2: Ht - mb, stroke: "#8c959f", "stroke-dasharray": "3 3", visibility: "hidden"});
    s.appendChild(guide);
    const readout = el("div", {class: "ax-readout ax-hint", text: "point at the curves to read them"});
    readouts.push(readout);
    s.addEventListener("mousemove", ev => {
      const box = s.getBoundingClientRect(), px = (ev.clientX - box.left) * Wd / box.width;
      let k = 0;
      xs.forEach((x, i) => { if (Math.abs(X(x) - px) < Math.abs(X(xs[k]) - px)) k = i; });
      guide.setAttribute("x1", X(xs[k])); guide.setAttribute("x2", X(xs[k])); guide.setAttribute("visibility", "visible");
      const vals = D.rows.map(r => [r.method, ((D.curves[r.method] || {})[panel.name] || [])[k]])
        .filter(([m, v]) => v !== null && v !== undefined && !state.hidden.has(m)).sort((a, b) => a[1] - b[1]);
      readout.classList.remove("ax-hint");
      readout.textContent = `${xs[k]}: ` + vals.map(([m, v]) => `${m} ${v.toFixed(3)}`).join(" \u00b7 ");
      readout.title = readout.textContent;
    });
    s.addEventListener("mouseleave", () => { guide.setAttribute("visibility", "hidden"); });
    curves.appendChild(el("div", {class: "ax-curve"}, [el("h4", {text: panel.title}), s, readout]));
  }
  root.appendChild(curves);

  const legend = el("div", {class: "ax-legend"});
  for (const r of D.rows) {
    const sw = svg("svg", {width: "22", height: "8", class: "ax-line-key"}, [
      svg("line", {x1: 0, x2: 22, y1: 4, y2: 4, stroke: style(r.method).color, "stroke-width": 2, "stroke-dasharray": style(r.method).dash})]);
    const item = el("span", {class: "ax-legend-item", "data-method": r.method, title: "click to hide or show"}, [sw, r.method]);
    item.addEventListener("click", () => {
      if (state.hidden.has(r.method)) state.hidden.delete(r.method); else state.hidden.add(r.method);
      item.classList.toggle("ax-off", state.hidden.has(r.method));
      for (const l of lines) l.classList.toggle("ax-hidden", state.hidden.has(l.dataset.method));
    });
    item.addEventListener("mouseenter", () => pick(r.method));
    item.addEventListener("mouseleave", () => pick(null));
    legend.appendChild(item);
  }
  root.appendChild(legend);

  function pick(method) {
    state.picked = method;
    for (const l of lines) {
      l.classList.toggle("ax-dim", method !== null && l.dataset.method !== method);
      l.classList.toggle("ax-strong", method !== null && l.dataset.method === method);
    }
  }

  const docs = el("dl", {class: "ax-docs"});
  for (const c of D.columns) docs.append(el("dt", {text: `${c.label} ${c.arrow}`}), el("dd", {text: c.doc}));
  root.appendChild(docs);
  render();
  root.dataset.ready = "true";
}
