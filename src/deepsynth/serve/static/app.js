// DeepSynth web UI: pick a template, give a document, read the streamed answer.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { templates: [], doc: null, renderTimer: null, renderSeq: 0, controller: null, auth: false };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function describeError(body, status) {
  if (!body || typeof body !== "object") return `Request failed (HTTP ${status}).`;
  let text = body.message || `Request failed (HTTP ${status}).`;
  if (body.field) text = `${body.field}: ${text}`;
  if (body.limit !== null && body.limit !== undefined && !String(text).includes(String(body.limit))) {
    text += ` (limit ${body.limit})`;
  }
  if (status === 503) text += " The server is busy; try again in a moment.";
  if (status === 401) { $("key-row").hidden = false; text += " Enter the API key above."; }
  return text;
}

async function readError(resp) {
  let body = null;
  try { body = await resp.json(); } catch (e) { /* not JSON */ }
  return describeError(body, resp.status);
}

// ------------------------------------------------------------------ document

function documentFields() {
  if (state.doc && state.doc.kind === "pdf") return { pdf: state.doc.data };
  if (state.doc && state.doc.kind === "pages") return { pages: state.doc.data };
  const text = $("text").value;
  if (!text.trim()) return null;
  return { text, markdown: $("markdown").checked };
}

function readFile(file, asText) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`could not read ${file.name}`));
    if (asText) reader.readAsText(file); else reader.readAsDataURL(file);
  });
}

async function onFiles() {
  const files = Array.from($("file").files);
  showError("");
  state.doc = null;
  $("file-row").hidden = true;
  if (!files.length) { scheduleRender(); return; }
  try {
    const first = files[0];
    const name = first.name.toLowerCase();
    if (name.endsWith(".pdf")) {
      state.doc = { kind: "pdf", data: await readFile(first, false) };
    } else if (files.every((f) => f.type.startsWith("image/"))) {
      state.doc = { kind: "pages", data: await Promise.all(files.map((f) => readFile(f, false))) };
    } else if (/\.(txt|md|markdown)$/.test(name) || first.type.startsWith("text/")) {
      $("text").value = await readFile(first, true);
      $("markdown").checked = /\.(md|markdown)$/.test(name);
    } else {
      showError(`${first.name}: unsupported file type (use .txt, .md, .pdf or images).`);
      return;
    }
    if (state.doc) {
      $("file-info").textContent = `Using ${files.map((f) => f.name).join(", ")}.`;
      $("file-row").hidden = false;
    }
  } catch (e) {
    showError(String(e.message || e));
  }
  scheduleRender();
}

function scheduleRender() {
  clearTimeout(state.renderTimer);
  state.renderTimer = setTimeout(renderPreview, 350);
}

async function renderPreview() {
  const fields = documentFields();
  const seq = ++state.renderSeq;
  if (!fields) { $("thumbs").replaceChildren(); $("render-stats").textContent = ""; return; }
  try {
    const resp = await fetch("/api/render", { method: "POST", headers: headers(),
      body: JSON.stringify({ ...fields, thumbnail_px: 160 }) });
    if (seq !== state.renderSeq) return;
    if (!resp.ok) { $("render-stats").textContent = await readError(resp); $("thumbs").replaceChildren(); return; }
    const r = await resp.json();
    const figures = r.thumbnails.map((src, i) => {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.src = src;
      img.alt = `page ${i + 1}`;
      const cap = document.createElement("figcaption");
      cap.textContent = `page ${i + 1}`;
      fig.append(img, cap);
      return fig;
    });
    $("thumbs").replaceChildren(...figures);
    const parts = [`${r.pages} page${r.pages === 1 ? "" : "s"}`];
    if (r.visual_tokens !== null) parts.push(`${r.visual_tokens} visual tokens`);
    if (r.text_tokens !== null) parts.push(`${r.text_tokens} text tokens`);
    if (r.compression !== null) parts.push(`compression ${r.compression.toFixed(2)}×`);
    $("render-stats").textContent = parts.join(" · ");
  } catch (e) {
    if (seq === state.renderSeq) $("render-stats").textContent = "Preview unavailable: " + (e.message || e);
  }
}

// ------------------------------------------------------------------ templates

function currentTemplate() {
  return state.templates.find((t) => t.id === $("template").value);
}

function onTemplate() {
  const t = currentTemplate();
  if (!t) return;
  $("input-row").hidden = !t.needs_input;
  $("input-label").textContent = t.input_label || "Input";
  let text = t.needs_input ? "" : `Instruction: “${t.instruction}”`;
  if (t.json_schema) {
    const fields = Object.keys(t.json_schema.properties || {}).join(", ");
    text += ` Answered as JSON${fields ? ` (${fields})` : ""}.`;
  }
  $("template-text").textContent = text;
}

async function loadTemplates() {
  const resp = await fetch("/api/templates", { headers: headers() });
  if (!resp.ok) { showError(await readError(resp)); return; }
  state.templates = (await resp.json()).templates;
  $("template").replaceChildren(...state.templates.map((t) => new Option(t.name, t.id)));
  onTemplate();
}

// ------------------------------------------------------------------ asking

function parseEvents(buffer, onEvent) {
  // Server-Sent Events: blocks separated by a blank line, "event:" and "data:" lines.
  let idx;
  while ((idx = buffer.indexOf("\n\n")) >= 0) {
    const block = buffer.slice(0, idx);
    buffer = buffer.slice(idx + 2);
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
    }
    if (data.length) onEvent(name, JSON.parse(data.join("\n")));
  }
  return buffer;
}

function showResult(r) {
  $("answer").textContent = r.answer;
  $("latency").textContent = `${Math.round(r.latency_ms)} ms`;
  $("compression").textContent = r.compression === null ? "n/a (image input)" : `${r.compression.toFixed(2)}× (${r.text_tokens} text tokens / ${r.visual_tokens} visual tokens)`;
  $("pages").textContent = String(r.pages);
  $("tokens").textContent = `${r.prompt_tokens} prompt, ${r.new_tokens} generated`;
  const why = { eos: "the model finished", max_new_tokens: "token limit reached", loop: "repetition detected (repeats removed)", cancelled: "stopped" };
  $("stopped").textContent = why[r.stopped] || r.stopped;
  $("stats").hidden = false;
  $("status").textContent = "Done.";
}

async function ask() {
  showError("");
  const fields = documentFields();
  if (!fields) { showError("Give a document: paste text or upload a file."); return; }
  const t = currentTemplate();
  const body = { ...fields, template: t ? t.id : "custom", stream: true,
                 max_new_tokens: Number($("max-tokens").value) || 128,
                 temperature: Number($("temperature").value) || 0 };
  if (t && t.json_schema) body.structured = true;  // the template's structured output
  if (t && t.needs_input) {
    const input = $("input").value.trim();
    if (!input) { showError(`${t.input_label || "Input"}: please type it first.`); return; }
    body.input = input;
  }
  $("answer").textContent = "";
  $("stats").hidden = true;
  $("status").textContent = "Waiting for the model…";
  $("submit").disabled = true;
  $("stop").hidden = false;
  state.controller = new AbortController();
  let finished = false;
  try {
    const resp = await fetch("/api/inference/instruct", { method: "POST", headers: headers(),
      body: JSON.stringify(body), signal: state.controller.signal });
    if (!resp.ok) { showError(await readError(resp)); $("status").textContent = ""; return; }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    $("status").textContent = "Answering…";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + decoder.decode(value, { stream: true }), (name, data) => {
        if (name === "token") $("answer").textContent += data.text;
        else if (name === "done") { finished = true; showResult(data); }
        else if (name === "error") { finished = true; showError(describeError(data, 500)); $("status").textContent = ""; }
      });
    }
    if (!finished) { showError("The answer stream ended early."); $("status").textContent = ""; }
  } catch (e) {
    if (e.name === "AbortError") $("status").textContent = "Stopped.";
    else { showError("Could not reach the server: " + (e.message || e)); $("status").textContent = ""; }
  } finally {
    $("submit").disabled = false;
    $("stop").hidden = true;
    state.controller = null;
  }
}

// ------------------------------------------------------------------ start

async function start() {
  $("template").addEventListener("change", onTemplate);
  $("text").addEventListener("input", () => { if (!state.doc) scheduleRender(); });
  $("markdown").addEventListener("change", scheduleRender);
  $("file").addEventListener("change", onFiles);
  $("clear-file").addEventListener("click", () => { $("file").value = ""; onFiles(); });
  $("submit").addEventListener("click", ask);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("api-key").value = sessionStorage.getItem("deepsynth-key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("deepsynth-key", $("api-key").value);
    loadTemplates();
    scheduleRender();
  });
  try {
    const health = await (await fetch("/health")).json();
    $("model").textContent = `model: ${health.model}`;
    $("key-row").hidden = !health.auth_required;
    if (health.limits) $("max-tokens").max = health.limits.max_new_tokens;
  } catch (e) {
    showError("Could not reach the server.");
  }
  await loadTemplates();
  document.body.dataset.ready = "1";
}

start();
