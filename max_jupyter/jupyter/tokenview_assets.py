"""The TokenView's front end, as strings (no build step, no CDN: works offline).

Protocol with ``tokenview.TokenView``:

- kernel -> page, custom message ``{"type": "tokens", "start": i, "n": total, "tokens": [...]}``:
  rows ``start..`` replace or extend the page's list, which is cut to ``n`` rows. A row is
  ``{"i": step, "t": text, "tok": id, "p": prob, "sc": {judge: score}, "st": [judged
  mixes], "mix": {name: coef}, "sd": the step's final forward added a delta, "rr": re-run,
  "ch": re-run changed the token, "ut": the first pass's token text, "big" / "small":
  [[text, logit], ...] or null}``;
- page -> kernel, custom message ``{"type": "sync"}`` when a view is rendered: the kernel
  answers with every row;
- trait ``selected_step``: set by a click on a token; ``status`` and ``judge``: shown / used.

Each token is one ``span.tv-tok`` with ``data-step``, ``data-mix`` (JSON of the live mix's
coefficients at that step) and ``data-tip`` (the tooltip's text, shown in ``.tv-tip`` under
the tokens while the pointer is on one: a box in the flow, so no output area clips it).
"""

ESM = r"""
const fmt = (x, d = 3) => (x === null || x === undefined) ? "n/a" : Number(x).toFixed(d);
const q = (s) => JSON.stringify(s);

function tipText(t) {
  const lines = [`step ${t.i} · token ${q(t.t)} (id ${t.tok}) · p ${fmt(t.p)}`];
  const scores = Object.entries(t.sc || {});
  lines.push("score: " + (scores.length ? scores.map(([k, v]) => `${k} ${fmt(v)}`).join(", ") : "none"));
  const mix = Object.entries(t.mix || {});
  lines.push("live mix: " + (mix.length ? mix.map(([k, v]) => `${k}=${fmt(v, 2)}`).join(", ") : "none"));
  lines.push("judged mixes: " + ((t.st && t.st.length) ? t.st.join(", ") : "none") + (t.sd ? " · steered" : " · not steered"));
  if (t.rr) lines.push(`re-run: the first pass chose ${q(t.ut)}${t.ch ? " (changed)" : " (same token)"}`);
  const alts = (name, list) => `${name} top-k: ` + list.map(([s, l]) => `${q(s)} ${fmt(l, 1)}`).join("  ");
  if (t.big) lines.push(alts("big", t.big)); else lines.push("top-k: shown when the generation ends");
  if (t.small) lines.push(alts("small", t.small));
  return lines.join("\n");
}

function judgeOf(model, tokens) {
  const chosen = model.get("judge");
  if (chosen) return chosen;
  for (const t of tokens) { const k = Object.keys(t.sc || {}); if (k.length) return k[0]; }
  return null;
}

function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "max-tokenview";
  const head = document.createElement("div");
  head.className = "tv-head";
  const body = document.createElement("div");
  body.className = "tv-body";
  const tip = document.createElement("div");
  tip.className = "tv-tip";
  tip.hidden = true;
  root.append(head, body, tip);
  el.append(root);
  const tokens = [];
  const spans = [];

  function paint(i) {
    while (spans.length <= i) {
      const s = document.createElement("span");
      s.className = "tv-tok";
      s.dataset.step = String(spans.length);
      body.append(s);
      spans.push(s);
    }
    const t = tokens[i], s = spans[i];
    s.textContent = t.t;
    s.classList.toggle("tv-empty", t.t === "");
    const mix = t.mix || {};
    s.classList.toggle("tv-steered", !!t.sd);
    s.classList.toggle("tv-rerun", !!t.rr);
    s.classList.toggle("tv-changed", !!t.ch);
    s.classList.toggle("tv-selected", i === model.get("selected_step"));
    s.dataset.mix = JSON.stringify(mix);
    s.dataset.tip = tipText(t);
  }

  function colour() {
    const judge = judgeOf(model, tokens);
    let scale = 0;
    for (const t of tokens) { const v = judge && t.sc ? t.sc[judge] : null; if (v !== null && v !== undefined) scale = Math.max(scale, Math.abs(v)); }
    tokens.forEach((t, i) => {
      const v = judge && t.sc ? t.sc[judge] : null;
      if (v === null || v === undefined || scale === 0) { spans[i].style.backgroundColor = ""; return; }
      const a = 0.12 + 0.55 * Math.abs(v) / scale;
      spans[i].style.backgroundColor = v >= 0 ? `rgba(255, 128, 0, ${a})` : `rgba(0, 110, 255, ${a})`;
    });
    spans.forEach((s) => s.dataset.judge = judge || "");
  }

  function onMessage(msg) {
    if (!msg || msg.type !== "tokens") return;
    msg.tokens.forEach((t, k) => { tokens[msg.start + k] = t; });
    tokens.length = msg.n;
    while (spans.length > msg.n) spans.pop().remove();
    for (let i = msg.start; i < msg.n; i++) paint(i);
    colour();
  }

  function select() {
    const chosen = model.get("selected_step");
    spans.forEach((s, i) => s.classList.toggle("tv-selected", i === chosen));
  }

  const status = () => { head.textContent = model.get("status"); };

  body.addEventListener("mouseover", (e) => {
    const s = e.target.closest(".tv-tok");
    if (!s) return;
    tip.textContent = s.dataset.tip;
    tip.hidden = false;
  });
  body.addEventListener("mouseleave", () => { tip.hidden = true; });
  body.addEventListener("click", (e) => {
    const s = e.target.closest(".tv-tok");
    if (!s) return;
    model.set("selected_step", Number(s.dataset.step));
    model.save_changes();
  });
  model.on("msg:custom", onMessage);
  model.on("change:selected_step", select);
  model.on("change:status", status);
  model.on("change:judge", colour);
  status();
  model.send({ type: "sync" });
  return () => {
    model.off("msg:custom", onMessage);
    model.off("change:selected_step", select);
    model.off("change:status", status);
    model.off("change:judge", colour);
  };
}

export default { render };
"""

CSS = r"""
.max-tokenview { font-family: var(--jp-code-font-family, monospace);
  font-size: 13px; line-height: 1.8; padding: 4px 0; }
.max-tokenview .tv-head { color: var(--jp-ui-font-color2, #666); font-size: 11px; margin-bottom: 4px; }
.max-tokenview .tv-body { white-space: pre-wrap; word-break: break-word; }
.max-tokenview .tv-tok { cursor: pointer; border-radius: 2px; }
.max-tokenview .tv-tok:hover { outline: 1px solid #777; }
.max-tokenview .tv-empty::after { content: "\00b7"; opacity: 0.5; }
.max-tokenview .tv-steered { border-bottom: 2px solid #8a2be2; }
.max-tokenview .tv-rerun { outline: 1px dashed #d22; }
.max-tokenview .tv-changed { font-weight: bold; }
.max-tokenview .tv-selected { outline: 2px solid #111; }
.max-tokenview .tv-tip { white-space: pre-wrap; background: #222; color: #eee; margin-top: 6px;
  padding: 6px 8px; border-radius: 4px; font-size: 11px; line-height: 1.5; }
"""
