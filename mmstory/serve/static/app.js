// The mmstory web page: pick / drop / record an input, caption it, then ask questions about it.
// Plain JavaScript against the JSON API (/v1/caption, /v1/answer); nothing is loaded from the internet.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, modalities: [], busy: false };
const OPTIONS = ["max_new_tokens", "num_beams", "temperature", "top_k", "top_p", "repetition_penalty", "seed"];

function bubble(kind, text, meta) {
  const hint = document.querySelector("#thread .hint");
  if (hint) hint.remove();
  const div = document.createElement("div");
  div.className = "bubble " + kind;
  div.textContent = text;
  if (meta) {
    const span = document.createElement("span");
    span.className = "meta";
    span.textContent = meta;
    div.appendChild(span);
  }
  $("thread").appendChild(div);
  $("thread").scrollTop = $("thread").scrollHeight;
  return div;
}

function timingText(t) {
  return `${t.total_ms.toFixed(0)} ms (model ${t.model_ms.toFixed(0)} ms, batch of ${t.batch_size})`;
}

function decodingFields(form) {
  for (const name of OPTIONS) {
    const value = $(name).value.trim();
    if (value !== "") form.append(name, value);
  }
  form.append("do_sample", $("do_sample").checked ? "true" : "false");
}

async function post(path, form) {
  const response = await fetch(path, { method: "POST", body: form });
  let body;
  try { body = await response.json(); } catch (e) { body = { error: `HTTP ${response.status}` }; }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function fieldFor(file) {
  const audio = file.type.startsWith("audio/") || /\.(wav|flac|ogg)$/i.test(file.name);
  return audio ? "audio" : "image";
}

function setBusy(busy) {
  state.busy = busy;
  $("ask").disabled = busy || !state.file;
  $("question").disabled = !state.file;
}

async function useFile(file) {
  state.file = file;
  const field = fieldFor(file);
  const preview = $("preview");
  preview.replaceChildren();
  const media = document.createElement(field === "audio" ? "audio" : "img");
  media.src = URL.createObjectURL(file);
  if (field === "audio") media.controls = true; else media.alt = file.name;
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = file.name;
  preview.append(media, name);
  $("thread").replaceChildren();
  const form = new FormData();
  form.append(field, file, file.name);
  decodingFields(form);
  const pending = bubble("pending", "captioning…");
  setBusy(true);
  try {
    const r = await post("/v1/caption", form);
    pending.remove();
    bubble("caption", r.caption, timingText(r.timings));
  } catch (e) {
    pending.remove();
    bubble("error", e.message);
  } finally {
    setBusy(false);
    $("question").focus();
  }
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || !state.file || state.busy) return;
  bubble("user", question);
  $("question").value = "";
  const form = new FormData();
  form.append(fieldFor(state.file), state.file, state.file.name);
  form.append("question", question);
  decodingFields(form);
  const pending = bubble("pending", "thinking…");
  setBusy(true);
  try {
    const r = await post("/v1/answer", form);
    pending.remove();
    bubble("answer", r.answer, timingText(r.timings));
  } catch (e) {
    pending.remove();
    bubble("error", e.message);
  } finally {
    setBusy(false);
  }
}

// ------------------------------------------------------------------ microphone: PCM samples -> a WAV file
const recorder = { context: null, stream: null, node: null, chunks: [] };

function wavFile(chunks, rate) {
  const n = chunks.reduce((s, c) => s + c.length, 0);
  const view = new DataView(new ArrayBuffer(44 + 2 * n));
  const text = (o, s) => { for (let i = 0; i < s.length; i++) view.setUint8(o + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * n, true); text(8, "WAVE"); text(12, "fmt ");
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, 2 * rate, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * n, true);
  let o = 44;
  for (const c of chunks) for (const x of c) { view.setInt16(o, Math.max(-1, Math.min(1, x)) * 0x7fff, true); o += 2; }
  return new File([view], "recording.wav", { type: "audio/wav" });
}

async function toggleRecording() {
  const button = $("record");
  if (recorder.context) {  // stop
    recorder.node.disconnect();
    recorder.stream.getTracks().forEach((t) => t.stop());
    const file = wavFile(recorder.chunks, recorder.context.sampleRate);
    await recorder.context.close();
    Object.assign(recorder, { context: null, stream: null, node: null, chunks: [] });
    button.classList.remove("on");
    button.textContent = "● record from the microphone";
    useFile(file);
    return;
  }
  try {
    recorder.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    bubble("error", "the microphone is not available: " + e.message);
    return;
  }
  recorder.context = new AudioContext();
  const source = recorder.context.createMediaStreamSource(recorder.stream);
  recorder.node = recorder.context.createScriptProcessor(4096, 1, 1);
  recorder.node.onaudioprocess = (e) => recorder.chunks.push(new Float32Array(e.inputBuffer.getChannelData(0)));
  source.connect(recorder.node);
  recorder.node.connect(recorder.context.destination);
  button.classList.add("on");
  button.textContent = "■ stop and caption";
}

// ------------------------------------------------------------------ start
async function start() {
  try {
    const m = await (await fetch("/v1/model")).json();
    state.modalities = m.modalities;
    const millions = (m.parameters / 1e6).toFixed(1);
    $("model-summary").textContent =
      `${m.modalities.join(" + ")} model · ${millions} M parameters · fusion ${m.fusion} · ` +
      `decoder ${m.decoder.depth} × ${m.decoder.dim}`;
    $("max_new_tokens").max = m.limits.max_new_tokens;
    $("max_new_tokens").value = m.decode_defaults.max_new_tokens;
    const accept = [];
    if (m.modalities.includes("image")) accept.push("image/*");
    if (m.modalities.includes("audio")) accept.push("audio/*", ".wav", ".flac", ".ogg");
    $("file-input").accept = accept.join(",");
    const canRecord = m.modalities.includes("audio") && navigator.mediaDevices && window.AudioContext;
    $("record").hidden = !canRecord;
  } catch (e) {
    $("model-summary").textContent = "cannot read /v1/model: " + e.message;
  }
  $("file-input").addEventListener("change", (e) => { if (e.target.files[0]) useFile(e.target.files[0]); });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files[0]) useFile(e.dataTransfer.files[0]);
  });
  $("record").addEventListener("click", toggleRecording);
  $("ask-form").addEventListener("submit", ask);
}

start();
