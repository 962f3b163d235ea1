// The TokenView's front end (anywidget ESM; no build step, nothing fetched from the network).
//
// Protocol with max_jupyter/jupyter/tokenview.py:
// - kernel -> page, custom message {type: "tokens", start, n, tokens: [row, ...]}: rows
//   start.. replace or extend the page's list, which is cut to n rows. A row is
//   {step, text, token (id), token_text (the token alone; bytes for part of a character),
//    model_prob (the model's probability of the token: softmax of its raw logits), sampler_prob
//    (the sampler's, 1 under greedy), scores: {judge: score}, mixes_on: [judge-gated mixes on],
//    live_coefs: {name: coef}, steered (the step's final forward added a delta), rerun,
//    changed (the re-run changed the token), first_pass_text (a re-run's first token),
//    big / small: [[text, logit], ...] or null until the generation ends}.
// - page -> kernel, custom message {type: "sync"} when a view is rendered: the kernel
//   answers with every row.
// - traits: selected_step (set by a click on a token), status (shown above the tokens),
//   judge (whose score colours the tokens), closed (the session is closed: say so, no clicks).
//
// Each token is one span.tv-tok with data-step, data-mix (JSON of the live mix's
// coefficients at that step) and data-tip (the tooltip's text, shown in .tv-tip under the
// tokens while the pointer is on one: a box in the flow, so no output area clips it).

const fmt = (x, d = 3) => (x === null || x === undefined) ? "n/a" : Number(x).toFixed(d);
const q = (s) => JSON.stringify(s);

function tipText(row) {
  // A token ending inside a character shows "" (the next token carries the character): say which bytes it holds.
  const part = (row.text === "" && row.token_text) ? ` (part of a character: ${row.token_text})` : "";
  const lines = [`step ${row.step} · token ${q(row.text)}${part} (id ${row.token}) · p ${fmt(row.model_prob)} (model; sampler ${fmt(row.sampler_prob)})`];
  const scores = Object.entries(row.scores || {});
  lines.push("score: " + (scores.length ? scores.map(([k, v]) => `${k} ${fmt(v)}`).join(", ") : "none"));
  const coefs = Object.entries(row.live_coefs || {});
  lines.push("live mix: " + (coefs.length ? coefs.map(([k, v]) => `${k}=${fmt(v, 2)}`).join(", ") : "none"));
  lines.push("judged mixes: " + ((row.mixes_on && row.mixes_on.length) ? row.mixes_on.join(", ") : "none")
             + (row.steered ? " · steered" : " · not steered"));
  if (row.rerun) lines.push(`re-run: the first pass chose ${q(row.first_pass_text)}${row.changed ? " (changed)" : " (same token)"}`);
  const alts = (name, list) => `${name} top-k: ` + list.map(([s, l]) => `${q(s)} ${fmt(l, 1)}`).join("  ");
  if (row.big) lines.push(alts("big", row.big)); else lines.push("top-k: shown when the generation ends");
  if (row.small) lines.push(alts("small", row.small));
  return lines.join("\n");
}

function judgeOf(model, rows) {
  const chosen = model.get("judge");
  if (chosen) return chosen;
  for (const row of rows) { const k = Object.keys(row.scores || {}); if (k.length) return k[0]; }
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
  const rows = [];
  const spans = [];

  function paint(i) {
    while (spans.length <= i) {
      const s = document.createElement("span");
      s.className = "tv-tok";
      s.dataset.step = String(spans.length);
      body.append(s);
      spans.push(s);
    }
    const row = rows[i], s = spans[i];
    s.textContent = row.text;
    s.classList.toggle("tv-empty", row.text === "");
    s.classList.toggle("tv-steered", !!row.steered);
    s.classList.toggle("tv-rerun", !!row.rerun);
    s.classList.toggle("tv-changed", !!row.changed);
    s.classList.toggle("tv-selected", i === model.get("selected_step"));
    s.dataset.mix = JSON.stringify(row.live_coefs || {});
    s.dataset.tip = tipText(row);
  }

  function colour() {
    const judge = judgeOf(model, rows);
    const score = (row) => (judge && row.scores) ? row.scores[judge] : null;
    let scale = 0;
    for (const row of rows) { const v = score(row); if (v !== null && v !== undefined) scale = Math.max(scale, Math.abs(v)); }
    rows.forEach((row, i) => {
      const v = score(row);
      if (v === null || v === undefined || scale === 0) { spans[i].style.backgroundColor = ""; return; }
      const a = 0.12 + 0.55 * Math.abs(v) / scale;
      spans[i].style.backgroundColor = v >= 0 ? `rgba(255, 128, 0, ${a})` : `rgba(0, 110, 255, ${a})`;
    });
    spans.forEach((s) => s.dataset.judge = judge || "");
  }

  function onMessage(msg) {
    if (!msg || msg.type !== "tokens") return;
    msg.tokens.forEach((row, k) => { rows[msg.start + k] = row; });
    rows.length = msg.n;
    while (spans.length > msg.n) spans.pop().remove();
    for (let i = msg.start; i < msg.n; i++) paint(i);
    colour();
  }

  function select() {
    const chosen = model.get("selected_step");
    spans.forEach((s, i) => s.classList.toggle("tv-selected", i === chosen));
  }

  const status = () => { head.textContent = model.get("status"); };
  const closed = () => { root.classList.toggle("tv-closed", !!model.get("closed")); };

  body.addEventListener("mouseover", (e) => {
    const s = e.target.closest(".tv-tok");
    if (!s) return;
    tip.textContent = s.dataset.tip;
    tip.hidden = false;
  });
  body.addEventListener("mouseleave", () => { tip.hidden = true; });
  body.addEventListener("click", (e) => {
    const s = e.target.closest(".tv-tok");
    if (!s || model.get("closed")) return;
    model.set("selected_step", Number(s.dataset.step));
    model.save_changes();
  });
  model.on("msg:custom", onMessage);
  model.on("change:selected_step", select);
  model.on("change:status", status);
  model.on("change:judge", colour);
  model.on("change:closed", closed);
  status();
  closed();
  model.send({ type: "sync" });
  return () => {
    model.off("msg:custom", onMessage);
    model.off("change:selected_step", select);
    model.off("change:status", status);
    model.off("change:judge", colour);
    model.off("change:closed", closed);
  };
}

export default { render };
