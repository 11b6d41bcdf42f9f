/* cnnc viz: the interactive page's script (inlined into each page by compiler/viz_html.py).
 *
 * The page holds Graphviz's SVG of the fully expanded graph and, in #cnnc-data, a description
 * of every layer (keyed by its SVG id, `node-<name>`) and block instance (keyed by its dotted
 * path; its cluster's SVG id is `cluster-<path>`). Collapsing a block instance hides what is
 * inside it and draws a summary box over the band its cluster took; that band is squeezed to the
 * box's size by a piecewise-linear map of the layout axis (y for TB, x for LR), applied to every
 * coordinate still shown, so the drawing closes up without a new layout. Plain DOM and SVG, no
 * libraries, no network.
 */
(function () {
  "use strict";
  var SVGNS = "http://www.w3.org/2000/svg";
  var data = JSON.parse(document.getElementById("cnnc-data").textContent);
  var canvas = document.getElementById("canvas");
  var svg = canvas.querySelector("svg");
  var root = svg.querySelector("g.graph") || svg.querySelector("g");
  var LR = data.rankdir === "LR";
  var PAIR = /(-?\d+(?:\.\d+)?),(-?\d+(?:\.\d+)?)/g;

  // Graphviz's <title> children would show as tooltips ("n12"); the details panel replaces them.
  Array.prototype.slice.call(svg.querySelectorAll("title")).forEach(function (t) { t.remove(); });

  var viewBox = svg.getAttribute("viewBox").split(/[\s,]+/).map(Number);
  var baseW = viewBox[2], baseH = viewBox[3];
  var zoom = 4 / 3;  // Graphviz sizes are in points

  function fmt(n) { return Number(n).toLocaleString("en-US"); }
  function human(n) {
    var units = [[1e9, "G"], [1e6, "M"], [1e3, "K"]];
    for (var i = 0; i < units.length; i++) {
      if (Math.abs(n) >= units[i][0]) {
        var v = n / units[i][0];
        return (v < 100 ? v.toPrecision(3).replace(/\.?0+$/, "") : Math.round(v)) + units[i][1];
      }
    }
    return String(n);
  }
  function esc(s) {
    return String(s).replace(/[&<>"]/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c];
    });
  }
  function prefixes(key) {
    if (!key) return [];
    var parts = key.split("."), out = [];
    for (var i = 1; i <= parts.length; i++) out.push(parts.slice(0, i).join("."));
    return out;
  }

  // ---- geometry: every shape and text whose coordinates the squeeze map moves ----------------
  var warpables = [];  // {el, attr, orig} for path d / polygon points; {el, text:true, x, y}
  function collect(el) {
    var shapes = el.querySelectorAll("path, polygon, polyline, text, ellipse");
    for (var i = 0; i < shapes.length; i++) {
      var s = shapes[i], tag = s.tagName.toLowerCase();
      if (tag === "path") warpables.push({ el: s, attr: "d", orig: s.getAttribute("d") });
      else if (tag === "polygon" || tag === "polyline") warpables.push({ el: s, attr: "points", orig: s.getAttribute("points") });
      else if (tag === "text") {
        warpables.push({ el: s, text: true, x: +s.getAttribute("x"), y: +s.getAttribute("y"),
                         edgeLabel: !!(s.closest && s.closest("g.edge")) });
      }
      else if (tag === "ellipse") warpables.push({ el: s, text: true, ellipse: true, x: +s.getAttribute("cx"), y: +s.getAttribute("cy") });
    }
  }
  function pointsBox(str, box) {
    str.replace(PAIR, function (m, x, y) {
      x = +x; y = +y;
      if (x < box.x0) box.x0 = x; if (x > box.x1) box.x1 = x;
      if (y < box.y0) box.y0 = y; if (y > box.y1) box.y1 = y;
      return m;
    });
    return box;
  }
  function emptyBox() { return { x0: Infinity, y0: Infinity, x1: -Infinity, y1: -Infinity }; }

  // layers
  var nodes = {};  // id → {el, info, box, prefixes}
  Object.keys(data.nodes).forEach(function (id) {
    var el = document.getElementById(id);
    if (!el) return;
    var box = emptyBox();
    Array.prototype.forEach.call(el.querySelectorAll("path, polygon"), function (s) {
      pointsBox(s.getAttribute("d") || s.getAttribute("points") || "", box);
    });
    var info = data.nodes[id];
    nodes[id] = { id: id, el: el, info: info, box: box, prefixes: prefixes(info.block) };
    el.addEventListener("mouseenter", function () { if (!pinned) showNode(id); });
    el.addEventListener("click", function (ev) { ev.stopPropagation(); pin(id); showNode(id); });
  });

  // block instances: clusters, summaries
  var blocks = {};  // key → {info, cluster, box, summary, members}
  Object.keys(data.blocks).forEach(function (key) {
    var info = data.blocks[key];
    var el = document.getElementById("cluster-" + key);
    var box = emptyBox();
    if (el) {
      var shape = el.querySelector("path, polygon");
      if (shape) pointsBox(shape.getAttribute("d") || shape.getAttribute("points"), box);
    }
    blocks[key] = { key: key, info: info, cluster: el, box: box, prefixes: prefixes(key) };
  });

  // a small "−" in each cluster's corner, and clicks on the cluster collapse it
  Object.keys(blocks).forEach(function (key) {
    var b = blocks[key];
    if (!b.cluster) return;
    var t = document.createElementNS(SVGNS, "text");
    t.setAttribute("class", "toggle");
    t.setAttribute("x", b.box.x1 - 12);
    t.setAttribute("y", b.box.y0 + 13);
    t.textContent = "\u2212";
    b.cluster.appendChild(t);
    b.cluster.addEventListener("click", function (ev) { ev.stopPropagation(); collapse(key); });
    b.cluster.addEventListener("mouseenter", function () { if (!pinned) showBlock(key); });
  });

  // summaries go on top of everything else
  var summaryLayer = document.createElementNS(SVGNS, "g");
  summaryLayer.setAttribute("id", "summaries");
  root.appendChild(summaryLayer);
  Object.keys(blocks).forEach(function (key) {
    var b = blocks[key], info = b.info;
    var g = document.createElementNS(SVGNS, "g");
    g.setAttribute("id", "summary-" + key);
    g.setAttribute("class", "summary hidden");
    var rect = document.createElementNS(SVGNS, "rect");
    rect.setAttribute("class", "box");
    rect.setAttribute("rx", 4);
    g.appendChild(rect);
    var lines = [["name", "\u25B8 " + info.name], ["", info.call]];
    if (data.showShapes) lines.push(["muted", (info.ins.join(", ") || "?") + " \u2192 " + (info.out || "?")]);
    lines.push(["muted", info.layers + " layers" + (data.showParams ? ", " + human(info.params) + " params" : "")]);
    b.texts = lines.map(function (l) {
      var t = document.createElementNS(SVGNS, "text");
      if (l[0]) t.setAttribute("class", l[0]);
      t.setAttribute("text-anchor", "middle");
      t.textContent = l[1];
      g.appendChild(t);
      return t;
    });
    g.addEventListener("click", function (ev) { ev.stopPropagation(); expand(key); });
    g.addEventListener("mouseenter", function () { if (!pinned) showBlock(key); });
    summaryLayer.appendChild(g);
    b.summary = g;
    b.rect = rect;
  });

  // edges
  var edges = data.edges.map(function (e) {
    return { el: document.getElementById(e[0]), src: e[1], dst: e[2], kind: e[3] };
  }).filter(function (e) { return e.el; });

  collect(root);  // every original coordinate, including the toggles, before anything moves
  var nodeList = Object.keys(nodes).map(function (k) { return nodes[k]; });
  var blockList = Object.keys(blocks).map(function (k) { return blocks[k]; });

  // ---- state ------------------------------------------------------------------------------
  var collapsed = {};
  if (data.initialDepth !== null && data.initialDepth !== undefined) {
    blockList.forEach(function (b) { if (b.info.depth > data.initialDepth) collapsed[b.key] = true; });
  }
  var pinned = null;

  function ownerOf(prefs) {  // the outermost collapsed block instance among a path's prefixes
    for (var i = 0; i < prefs.length; i++) if (collapsed[prefs[i]]) return prefs[i];
    return null;
  }

  function axisRange(box) { return LR ? [box.x0, box.x1] : [box.y0, box.y1]; }
  function crossRange(box) { return LR ? [box.y0, box.y1] : [box.x0, box.x1]; }
  function overlaps(a, b) { return a[0] < b[1] - 0.5 && b[0] < a[1] - 0.5; }

  // Can block b's band be squeezed? Only when no layer outside it and no cluster beside it
  // (neither an ancestor nor a descendant) shares any of the band.
  var exclusiveCache = {};
  function exclusive(b) {
    if (b.key in exclusiveCache) return exclusiveCache[b.key];
    var band = axisRange(b.box), ok = true, i;
    for (i = 0; i < nodeList.length && ok; i++) {
      var n = nodeList[i];
      if (n.prefixes.indexOf(b.key) >= 0) continue;
      if (overlaps(band, axisRange(n.box))) ok = false;
    }
    for (i = 0; i < blockList.length && ok; i++) {
      var o = blockList[i];
      if (o === b || !o.cluster) continue;
      if (o.prefixes.indexOf(b.key) >= 0 || b.prefixes.indexOf(o.key) >= 0) continue;
      if (overlaps(band, axisRange(o.box))) ok = false;
    }
    exclusiveCache[b.key] = ok;
    return ok;
  }

  function summarySize(b) {
    // [length along the layout axis, length across it] the summary box needs
    var widest = 0;
    b.texts.forEach(function (t) {
      var w = 0;
      try { w = t.getComputedTextLength(); } catch (e) { w = t.textContent.length * 6; }
      if (!w) w = t.textContent.length * 6;
      widest = Math.max(widest, w);
    });
    var tall = b.texts.length * 13 + 12, wide = widest + 20;
    return LR ? [wide, tall] : [tall, wide];
  }

  var warp = function (v) { return v; };
  var squeezed = function (v) { return false; };  // inside a squeezed band
  var shrink = 0;

  function makeWarp(bands) {
    bands.sort(function (a, b) { return a.a - b.a; });
    var total = 0;
    bands.forEach(function (band) { band.before = total; total += band.b - band.a - band.h; });
    shrink = total;
    squeezed = function (v) {
      for (var i = 0; i < bands.length; i++) if (v > bands[i].a + 2 && v < bands[i].b - 2) return true;
      return false;
    };
    return function (v) {
      for (var i = bands.length - 1; i >= 0; i--) {
        var band = bands[i];
        if (v >= band.b) return v - band.before - (band.b - band.a - band.h);
        if (v > band.a) return band.a - band.before + (v - band.a) * band.h / (band.b - band.a);
      }
      return v;
    };
  }

  function warpPair(m, x, y) {
    x = +x; y = +y;
    if (LR) x = warp(x); else y = warp(y);
    return x.toFixed(2) + "," + y.toFixed(2);
  }

  function update() {
    // which block instances show as summaries, and which bands squeeze
    var shown = [], bands = [];
    blockList.forEach(function (b) {
      var owner = ownerOf(b.prefixes);
      b.showSummary = owner === b.key;
      b.showCluster = owner === null;
      if (b.showSummary) {
        shown.push(b);
        var size = summarySize(b), range = axisRange(b.box);
        b.need = size;
        if (isFinite(range[0]) && exclusive(b) && range[1] - range[0] > size[0] + 8) {
          bands.push({ a: range[0], b: range[1], h: size[0] });
        }
      }
    });
    warp = makeWarp(bands);

    // visibility
    nodeList.forEach(function (n) {
      n.owner = ownerOf(n.prefixes);
      n.el.classList.toggle("hidden", n.owner !== null);
    });
    edges.forEach(function (e) {
      var a = nodes[e.src], b = nodes[e.dst];
      var hide = a && b && a.owner !== null && a.owner === b.owner;
      e.el.classList.toggle("hidden", !!hide);
    });
    blockList.forEach(function (b) {
      if (b.cluster) b.cluster.classList.toggle("hidden", !b.showCluster);
      b.summary.classList.toggle("hidden", !b.showSummary);
    });

    // geometry
    warpables.forEach(function (w) {
      if (w.text) {
        var x = w.x, y = w.y;
        if (LR) x = warp(x); else y = warp(y);
        w.el.setAttribute(w.ellipse ? "cx" : "x", x);
        w.el.setAttribute(w.ellipse ? "cy" : "y", y);
        if (w.edgeLabel) w.el.classList.toggle("hidden", squeezed(LR ? w.x : w.y));
      } else if (w.orig) {
        w.el.setAttribute(w.attr, w.orig.replace(PAIR, warpPair));
      }
    });
    // layers move as a whole, by where their centre goes
    nodeList.forEach(function (n) {
      if (n.owner !== null) return;
      var c = LR ? (n.box.x0 + n.box.x1) / 2 : (n.box.y0 + n.box.y1) / 2;
      var d = warp(c) - c;
      n.el.setAttribute("transform", LR ? "translate(" + d + ",0)" : "translate(0," + d + ")");
    });
    shown.forEach(function (b) { placeSummary(b); });

    var w = LR ? baseW - shrink : baseW, h = LR ? baseH : baseH - shrink;
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    svg.setAttribute("width", (w * zoom).toFixed(1));
    svg.setAttribute("height", (h * zoom).toFixed(1));
    updateCounts();
  }

  // layers are translated whole (below), so their own shapes stay out of the squeeze map
  (function markNodeShapes() {
    var inNode = new Set();
    nodeList.forEach(function (n) {
      n.el.querySelectorAll("path, polygon, text, ellipse").forEach(function (s) { inNode.add(s); });
    });
    warpables = warpables.filter(function (w) { return !inNode.has(w.el); });
  })();

  function placeSummary(b) {
    var a = axisRange(b.box), c = crossRange(b.box);
    var a0 = warp(a[0]), a1 = warp(a[1]);
    var cross = Math.max(c[1] - c[0], b.need[1]), mid = (c[0] + c[1]) / 2;
    var c0 = mid - cross / 2;
    var x, y, w, h;
    if (LR) { x = a0; w = a1 - a0; y = c0; h = cross; } else { y = a0; h = a1 - a0; x = c0; w = cross; }
    b.rect.setAttribute("x", x); b.rect.setAttribute("y", y);
    b.rect.setAttribute("width", Math.max(w, 10)); b.rect.setAttribute("height", Math.max(h, 10));
    var lineH = 13, top = y + h / 2 - (b.texts.length * lineH) / 2 + 10;
    b.texts.forEach(function (t, i) {
      t.setAttribute("x", x + w / 2);
      t.setAttribute("y", top + i * lineH);
    });
  }

  function visibleNodeCount() {
    return nodeList.filter(function (n) { return n.owner === null; }).length;
  }
  function updateCounts() {
    var nCollapsed = blockList.filter(function (b) { return b.showSummary; }).length;
    document.getElementById("counts").textContent =
      visibleNodeCount() + " of " + nodeList.length + " layers shown" +
      (nCollapsed ? ", " + nCollapsed + " collapsed blocks" : "");
  }

  function collapse(key) { collapsed[key] = true; update(); showBlock(key); }
  function expand(key) {
    prefixes(key).forEach(function (p) { delete collapsed[p]; });
    update();
    showBlock(key);
  }
  function setAll(flag) {
    collapsed = {};
    if (flag) blockList.forEach(function (b) { collapsed[b.key] = true; });
    update();
  }

  // ---- details panel ------------------------------------------------------------------------
  var details = document.getElementById("details");
  function row(k, v) { return "<tr><td>" + esc(k) + "</td><td>" + v + "</td></tr>"; }
  function sourceHtml(info) {
    if (!info.line) return "";
    return "<p class=\"sub\">" + esc(info.file) + ":" + info.line + (info.col ? ":" + info.col : "") + "</p>" +
      "<pre>" + esc(info.line) + " | " + esc((info.src || "").trim()) + "</pre>";
  }
  function pin(id) { pinned = id; }
  function showNode(id) {
    var n = nodes[id];
    if (!n) return;
    var d = n.info, h = "";
    h += "<h2>" + esc(d.name) + "</h2>";
    h += "<p class=\"sub\"><span class=\"swatch\" style=\"background:" + (data.colors[d.kind] || "#fff") + "\"></span>" +
      esc(d.text) + (pinned === id ? " <span class=\"pinned\">(pinned; click the background to unpin)</span>" : "") + "</p>";
    h += "<table>";
    h += row("op", esc(d.op));
    Object.keys(d.attrs).forEach(function (k) { h += row(k, esc(d.attrs[k])); });
    if (d.fused.length) h += row("fused", d.fused.map(esc).join("<br>"));
    h += row("inputs", d.inputs.length ? d.inputs.map(esc).join(", ") : "\u2014");
    h += row("output", esc(d.shape || "?"));
    h += row("params", fmt(d.params));
    h += row("MACs", fmt(d.macs) + (d.batch > 1 ? " (batch " + d.batch + ")" : ""));
    if (d.block) h += row("block", esc(d.block));
    h += "</table>";
    h += sourceHtml(d);
    details.innerHTML = h;
  }
  function showBlock(key) {
    var b = blocks[key];
    if (!b) return;
    var d = b.info, h = "";
    h += "<h2>" + esc(key) + "</h2>";
    h += "<p class=\"sub\">block instance: " + esc(d.call) + "</p><table>";
    h += row("inputs", d.ins.length ? d.ins.map(esc).join(", ") : "\u2014");
    h += row("output", esc(d.out || "?"));
    h += row("layers", fmt(d.layers));
    h += row("params", fmt(d.params));
    h += row("MACs", fmt(d.macs));
    h += row("state", collapsed[key] ? "collapsed (click it to expand)" : "expanded (click its box to collapse)");
    h += "</table>";
    h += sourceHtml(d);
    details.innerHTML = h;
  }
  canvas.addEventListener("click", function () { pinned = null; });

  // ---- search -------------------------------------------------------------------------------
  var search = document.getElementById("search");
  var results = document.getElementById("results");
  var matchCount = document.getElementById("match-count");
  var matches = [], active = -1;

  function runSearch(q) {
    q = q.trim().toLowerCase();
    nodeList.forEach(function (n) { n.el.classList.remove("match"); });
    blockList.forEach(function (b) { b.summary.classList.remove("match"); });
    matches = [];
    if (q) {
      nodeList.forEach(function (n) {
        var name = n.info.name.toLowerCase(), local = n.info.local.toLowerCase();
        var rank = local === q || name === q ? 0 : name.indexOf(q) === 0 || local.indexOf(q) === 0 ? 1
          : name.indexOf(q) >= 0 ? 2 : -1;
        if (rank >= 0) matches.push({ n: n, rank: rank });
      });
      matches.sort(function (a, b) { return a.rank - b.rank; });
      matches = matches.map(function (m) { return m.n; });
      matches.forEach(function (n) {
        n.el.classList.add("match");
        var owner = ownerOf(n.prefixes);
        if (owner) blocks[owner].summary.classList.add("match");
      });
    }
    matchCount.textContent = q ? matches.length + (matches.length === 1 ? " match" : " matches") : "";
    results.innerHTML = "";
    matches.slice(0, 200).forEach(function (n, i) {
      var li = document.createElement("li");
      li.setAttribute("data-id", n.id);
      li.innerHTML = esc(n.info.name) + "<span class=\"op\">" + esc(n.info.text) + "</span>";
      li.addEventListener("mousedown", function (ev) { ev.preventDefault(); reveal(n.id); });
      results.appendChild(li);
    });
    results.hidden = !q || !matches.length;
    active = matches.length ? 0 : -1;
    markActive();
  }
  function markActive() {
    Array.prototype.forEach.call(results.children, function (li, i) { li.classList.toggle("active", i === active); });
  }
  function reveal(id) {
    var n = nodes[id];
    if (!n) return;
    var changed = false;
    n.prefixes.forEach(function (p) { if (collapsed[p]) { delete collapsed[p]; changed = true; } });
    if (changed) update();
    nodeList.forEach(function (m) { m.el.classList.remove("focus"); });
    n.el.classList.add("focus");
    pinned = id;
    showNode(id);
    results.hidden = true;
    n.el.scrollIntoView({ block: "center", inline: "center" });
  }
  search.addEventListener("input", function () { runSearch(search.value); });
  search.addEventListener("focus", function () { if (matches.length) results.hidden = false; });
  search.addEventListener("blur", function () { results.hidden = true; });
  search.addEventListener("keydown", function (ev) {
    if (ev.key === "ArrowDown" && matches.length) { active = Math.min(active + 1, Math.min(matches.length, 200) - 1); markActive(); ev.preventDefault(); }
    else if (ev.key === "ArrowUp" && matches.length) { active = Math.max(active - 1, 0); markActive(); ev.preventDefault(); }
    else if (ev.key === "Enter" && matches.length) { reveal(matches[Math.max(active, 0)].id); ev.preventDefault(); }
    else if (ev.key === "Escape") { search.value = ""; runSearch(""); }
  });

  // ---- toolbar ------------------------------------------------------------------------------
  function setZoom(z) {
    zoom = Math.min(Math.max(z, 0.05), 8);
    var vb = svg.getAttribute("viewBox").split(/[\s,]+/).map(Number);
    svg.setAttribute("width", (vb[2] * zoom).toFixed(1));
    svg.setAttribute("height", (vb[3] * zoom).toFixed(1));
  }
  document.getElementById("zoom-in").addEventListener("click", function () { setZoom(zoom * 1.25); });
  document.getElementById("zoom-out").addEventListener("click", function () { setZoom(zoom / 1.25); });
  document.getElementById("zoom-fit").addEventListener("click", function () {
    var vb = svg.getAttribute("viewBox").split(/[\s,]+/).map(Number);
    setZoom((canvas.clientWidth - 4) / vb[2]);
  });
  document.getElementById("expand-all").addEventListener("click", function () { setAll(false); });
  document.getElementById("collapse-all").addEventListener("click", function () { setAll(true); });
  canvas.addEventListener("wheel", function (ev) {
    if (!ev.ctrlKey) return;
    ev.preventDefault();
    setZoom(zoom * (ev.deltaY < 0 ? 1.1 : 1 / 1.1));
  }, { passive: false });

  update();

  // for tests and the console
  window.cnncViz = {
    expand: expand, collapse: collapse, setAll: setAll, reveal: reveal, search: runSearch,
    visibleNodeCount: visibleNodeCount,
    collapsed: function () { return Object.keys(collapsed).filter(function (k) { return collapsed[k]; }); },
    matches: function () { return matches.map(function (n) { return n.info.name; }); }
  };
})();
