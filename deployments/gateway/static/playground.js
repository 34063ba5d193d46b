// StableAvatar playground: upload the inputs, submit through the fal queue API, follow the job, play the video.
//
// Every request URL is resolved against document.baseURI, never from "/", so the same page works when the app
// is mounted under a route prefix ("/avatar/"). Uploads follow @fal-ai/client exactly (POST
// storage/upload/initiate, then PUT the bytes to upload_url), so the playground exercises the routes real
// clients use. Status comes from the SSE stream (status/stream?logs=1); if that fails, the page polls.

const KEY_STORAGE = "stable-avatar.api-key";
const DEFAULT_APP_ID = "fal-ai/stable-avatar";
const POLL_MS = 500;
const MAX_POLL_FAILURES = 10;
const STREAM_IDLE_MS = 25000;
const HEALTH_RETRY_MS = 3000;
// loc[1] of a 422 detail entry -> the id of the input it concerns (other fields use their own name as id).
const INPUT_FOR_FIELD = { image_url: "image", audio_url: "audio" };
const STAGES = {
  queued: "waiting in the queue", starting: "starting", preprocessing: "preparing the inputs",
  denoising: "generating frames", postprocessing: "encoding the video", completed: "done",
  failed: "failed", cancelled: "cancelled",
};

const $ = (id) => document.getElementById(id);
const pageUrl = (path) => new URL(path, document.baseURI);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
// forcing polling (?transport=poll) lets a test cover the fallback path
const FORCE_POLL = new URLSearchParams(location.search).get("transport") === "poll";

const app = {
  appId: DEFAULT_APP_ID,
  requestId: null,
  uploads: new WeakMap(), // File -> {key, url}: a re-submit with the same files does not upload them again
  lastLogKey: null,
  previews: {},
};

/** A non-2xx answer; ``detail`` is fal's detail (a string, or the 422 list of {loc, msg}). */
class HttpError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

// -- HTTP -------------------------------------------------------------------------------------------------------

function apiKey() {
  return $("api_key").value.trim();
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, authorization: `Key ${key}` } : { ...extra };
}

async function readBody(response) {
  const text = await response.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

async function api(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { "content-type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(pageUrl(path), init);
  const data = await readBody(response);
  if (!response.ok) {
    throw new HttpError(response.status, data && typeof data === "object" && "detail" in data ? data.detail : data);
  }
  return { status: response.status, data };
}

/** initiate + PUT, as @fal-ai/client does; the presigned upload_url takes no API key. */
async function upload(file) {
  const cached = app.uploads.get(file);
  if (cached && cached.key === apiKey()) return cached.url; // uploads belong to the key that made them
  const contentType = file.type || "application/octet-stream";
  const { data: ticket } = await api("POST", "storage/upload/initiate?storage_type=fal-cdn-v3",
    { content_type: contentType, file_name: file.name || "upload.bin" });
  const response = await fetch(ticket.upload_url, {
    method: "PUT", body: file, headers: { "content-type": contentType },
  });
  if (!response.ok) {
    const data = await readBody(response);
    throw new HttpError(response.status, (data && data.detail) || `upload failed (HTTP ${response.status})`);
  }
  app.uploads.set(file, { key: apiKey(), url: ticket.file_url });
  return ticket.file_url;
}

// -- errors -----------------------------------------------------------------------------------------------------

function inputFor(field) {
  return $(INPUT_FOR_FIELD[field] || field);
}

function setFieldError(field, message) {
  const box = $(`${field}-error`);
  if (!box) return false;
  box.textContent = message;
  const input = inputFor(field);
  if (input) input.setAttribute("aria-invalid", "true");
  return true;
}

function clearFieldError(field) {
  const box = $(`${field}-error`);
  if (box) box.textContent = "";
  const input = inputFor(field);
  if (input) input.removeAttribute("aria-invalid");
}

function clearErrors() {
  for (const box of document.querySelectorAll(".field-error")) box.textContent = "";
  for (const input of document.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  $("form-error").textContent = "";
}

function detailText(detail) {
  if (detail == null) return "no details";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((d) => (d && d.msg) || JSON.stringify(d)).join("; ");
  return JSON.stringify(detail);
}

/** Show a 422 detail list next to the fields it names (loc[1]); anything else goes under the form. */
function showValidation(detail) {
  const loose = [];
  let first = null;
  for (const entry of detail) {
    const field = Array.isArray(entry.loc) && entry.loc[0] === "body" ? entry.loc[1] : undefined;
    const message = entry.msg || JSON.stringify(entry);
    if (field !== undefined && setFieldError(String(field), message)) {
      first = first || inputFor(String(field));
    } else {
      loose.push(message);
    }
  }
  if (loose.length) $("form-error").textContent = loose.join("; ");
  if (first) first.focus();
}

function showAuthError(status, detail) {
  $("api_key-field").hidden = false;
  const what = status === 401 ? "An API key is required" : "The API key was not accepted";
  setFieldError("api_key", `${what} (${detailText(detail)}).`);
  $("api_key").focus();
}

/** True for fal's field-level detail ([{loc: ["body", field], msg}]): 422, but also 413/415 for bad media. */
function isFieldDetail(detail) {
  return Array.isArray(detail) && detail.length > 0 && detail.every((d) => d && Array.isArray(d.loc));
}

function showError(err) {
  if (err instanceof HttpError && err.status < 500 && isFieldDetail(err.detail)) {
    showValidation(err.detail);
  } else if (err instanceof HttpError && (err.status === 401 || err.status === 403)) {
    showAuthError(err.status, err.detail);
  } else if (err instanceof HttpError) {
    $("form-error").textContent = `Server error (HTTP ${err.status}): ${detailText(err.detail)}`;
  } else {
    $("form-error").textContent = `Could not reach the server: ${err && err.message ? err.message : err}`;
  }
}

// -- the form ---------------------------------------------------------------------------------------------------

/** Check what the browser can check (files, prompt, numbers and their bounds) before uploading anything. */
function collect() {
  const errors = [];
  const payload = { prompt: $("prompt").value.trim(), aspect_ratio: $("aspect_ratio").value };
  if ($("acceleration").value) payload.acceleration = $("acceleration").value;  // "": the server's default
  const image = $("image").files[0];
  const audio = $("audio").files[0];
  if (!image) errors.push(["image_url", "Choose a reference image."]);
  else if (image.type && !image.type.startsWith("image/")) errors.push(["image_url", `Not an image (${image.type}).`]);
  if (!audio) errors.push(["audio_url", "Choose an audio file."]);
  else if (audio.type && !/^(audio|video)\//.test(audio.type)) errors.push(["audio_url", `Not audio (${audio.type}).`]);
  if (!payload.prompt) errors.push(["prompt", "Enter a prompt."]);
  for (const input of document.querySelectorAll("input[data-kind]")) {
    const raw = input.value.trim();
    if (!raw && !input.validity.badInput && input.dataset.optional) continue;
    const value = Number(raw);
    const min = input.min === "" ? -Infinity : Number(input.min);
    const max = input.max === "" ? Infinity : Number(input.max);
    if (!raw || input.validity.badInput || !Number.isFinite(value)) {
      errors.push([input.id, "Enter a number."]);
    } else if (input.dataset.kind === "int" && !Number.isInteger(value)) {
      errors.push([input.id, "Enter a whole number."]);
    } else if (value < min || value > max) {
      errors.push([input.id, max === Infinity ? `Must be at least ${min}.` : `Must be between ${min} and ${max}.`]);
    } else {
      payload[input.id] = value;
    }
  }
  return { payload, errors, files: { image, audio } };
}

async function uploadAs(field, file) {
  try {
    return await upload(file);
  } catch (err) {
    if (err instanceof HttpError && err.status !== 401 && err.status !== 403) {
      throw new HttpError(422, [{ loc: ["body", field], msg: `Upload failed: ${detailText(err.detail)}` }]);
    }
    throw err;
  }
}

async function onSubmit(event) {
  event.preventDefault();
  clearErrors();
  const { payload, errors, files } = collect();
  if (errors.length) {
    showValidation(errors.map(([field, msg]) => ({ loc: ["body", field], msg })));
    return;
  }
  resetOutput();
  setBusy(true);
  try {
    setJob("uploading", "Uploading the image…");
    payload.image_url = await uploadAs("image_url", files.image);
    setJob("uploading", "Uploading the audio…");
    payload.audio_url = await uploadAs("audio_url", files.audio);
    setJob("uploading", "Submitting…");
    const { data } = await api("POST", app.appId, payload);
    app.requestId = data.request_id;
    $("job-id").textContent = `Request ${data.request_id}`;
    $("cancel").hidden = false;
    render({ status: "IN_QUEUE", queue_position: data.queue_position, progress: { stage: "queued", fraction: 0 } });
    const final = await follow(data.request_id);
    await finish(data.request_id, final);
  } catch (err) {
    showError(err);
    setJob("failed", "Failed.");
  } finally {
    setBusy(false);
    $("cancel").hidden = true;
  }
}

async function onCancel() {
  if (!app.requestId) return;
  $("cancel").disabled = true;
  try {
    await api("PUT", `${requestPath(app.requestId)}/cancel`);
    setJob("running", "Cancelling…");
  } catch (err) {
    if (!(err instanceof HttpError && err.status === 400)) showError(err); // 400: it had already finished
  } finally {
    $("cancel").disabled = false;
  }
}

// -- following a job --------------------------------------------------------------------------------------------

function requestPath(id) {
  return `${app.appId}/requests/${encodeURIComponent(id)}`;
}

/** The job's final status object: from the SSE stream, or by polling when the stream is unavailable. */
async function follow(id) {
  if (!FORCE_POLL) {
    try {
      const final = await followStream(`${requestPath(id)}/status/stream?logs=1`);
      if (final) return final;
    } catch (err) {
      if (err instanceof HttpError && [401, 403, 404].includes(err.status)) throw err;
      // anything else (a proxy that buffers or drops the stream): fall back to polling
    }
  }
  return poll(`${requestPath(id)}/status?logs=1`);
}

async function followStream(path) {
  // The server sends a keep-alive every 10 s; silence for longer means a proxy is buffering: poll instead.
  const abort = new AbortController();
  let watchdog = setTimeout(() => abort.abort(), STREAM_IDLE_MS);
  try {
    const response = await fetch(pageUrl(path), {
      headers: headers({ accept: "text/event-stream" }), signal: abort.signal,
    });
    if (!response.ok || !response.body) throw new HttpError(response.status, await readBody(response));
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return null;
      clearTimeout(watchdog);
      watchdog = setTimeout(() => abort.abort(), STREAM_IDLE_MS);
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue; // a keep-alive comment
        const body = JSON.parse(data);
        render(body);
        if (body.status === "COMPLETED") {
          abort.abort();
          return body;
        }
      }
    }
  } finally {
    clearTimeout(watchdog);
  }
}

async function poll(path) {
  let failures = 0;
  for (;;) {
    let data;
    try {
      ({ data } = await api("GET", path)); // 202 while running, 200 when completed
      failures = 0;
    } catch (err) {
      // a restarting proxy or a dropped connection should not end the page's interest in the job
      const transient = !(err instanceof HttpError) || err.status >= 502;
      if (!transient || ++failures > MAX_POLL_FAILURES) throw err;
      await sleep(POLL_MS * 4);
      continue;
    }
    render(data);
    if (data.status === "COMPLETED") return data;
    await sleep(POLL_MS);
  }
}

async function finish(id, final) {
  if (final.error) {
    if (final.error_type === "client_cancelled") {
      setJob("cancelled", "Cancelled.");
      return;
    }
    try {
      await api("GET", requestPath(id)); // answers with the job's error: a 422 names the field
    } catch (err) {
      showError(err);
    }
    setJob("failed", `Failed: ${final.error}`); // last, so whoever waits for "failed" sees the errors too
    return;
  }
  const { data } = await api("GET", requestPath(id));
  const video = data.video;
  $("video").src = video.url;
  $("download").href = video.url;
  $("download").download = video.file_name || "stable-avatar.mp4";
  $("result-meta").textContent = `${(video.file_size / 1e6).toFixed(2)} MB · seed ${data.seed}`;
  $("result").hidden = false;
  setProgress(1);
  setJob("completed", "Completed.");
}

// -- rendering --------------------------------------------------------------------------------------------------

function setJob(state, text) {
  document.body.dataset.job = state;
  // the status line is a live region: rewrite it only when it changes, or screen readers repeat it
  if ($("job-status").textContent !== text) $("job-status").textContent = text;
}

function setBusy(busy) {
  $("submit").disabled = busy;
  $("submit").textContent = busy ? "Working…" : "Generate";
}

function setProgress(fraction) {
  const percent = Math.max(0, Math.min(100, Math.round(fraction * 100)));
  $("progress").value = percent;
  $("progress-text").textContent = `${percent}%`;
}

function resetOutput() {
  app.requestId = null;
  app.lastLogKey = null;
  $("logs").replaceChildren();
  $("result").hidden = true;
  $("video").removeAttribute("src");
  $("video").load();
  $("job-id").textContent = "";
  setProgress(0);
}

function render(body) {
  const progress = body.progress || {};
  if (body.status === "IN_QUEUE") {
    const ahead = body.queue_position ?? 0;
    setJob("queued", ahead > 0 ? `Queued: position ${ahead} (${ahead} ahead of you).` : "Queued: next in line.");
  } else if (body.status === "IN_PROGRESS") {
    setJob("running", `Running: ${STAGES[progress.stage] || progress.stage || "working"}…`);
  }
  if (typeof progress.fraction === "number") setProgress(progress.fraction);
  appendLogs(body.logs || []);
}

/** The stream sends only new lines, a poll sends them all (the last 500): skip what is already shown. */
function appendLogs(entries) {
  const keys = entries.map((e) => `${e.timestamp}|${e.message}`);
  const seen = app.lastLogKey === null ? -1 : keys.lastIndexOf(app.lastLogKey);
  const fresh = entries.slice(seen + 1);
  if (!fresh.length) return;
  app.lastLogKey = keys[keys.length - 1];
  const list = $("logs");
  for (const entry of fresh) {
    const item = document.createElement("li");
    item.className = `log level-${String(entry.level || "INFO").toLowerCase()}`;
    const time = document.createElement("time");
    time.dateTime = entry.timestamp || "";
    time.textContent = String(entry.timestamp || "").slice(11, 19);
    item.append(time, " ", entry.message || "");
    list.append(item);
  }
  list.scrollTop = list.scrollHeight;
}

// -- inputs: previews, drag and drop, API key -------------------------------------------------------------------

function preview(inputId, element) {
  const file = $(inputId).files[0];
  if (app.previews[inputId]) URL.revokeObjectURL(app.previews[inputId]);
  app.previews[inputId] = file ? URL.createObjectURL(file) : null;
  element.hidden = !file;
  if (file) element.src = app.previews[inputId];
  else element.removeAttribute("src");
}

function setUpDropZones() {
  for (const zone of document.querySelectorAll(".drop[data-input]")) {
    const input = $(zone.dataset.input);
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("dragging");
      if (event.dataTransfer && event.dataTransfer.files.length) {
        input.files = event.dataTransfer.files;
        input.dispatchEvent(new Event("change", { bubbles: true }));
      }
    });
  }
  $("image").addEventListener("change", () => {
    clearFieldError("image_url");
    preview("image", $("image-preview"));
  });
  $("audio").addEventListener("change", () => {
    clearFieldError("audio_url");
    preview("audio", $("audio-preview"));
  });
  $("image-preview").addEventListener("error", () => { $("image-preview").hidden = true; });
}

function setUpFieldClearing() {
  for (const input of document.querySelectorAll("#form input:not([type=file]), #form textarea, #form select")) {
    input.addEventListener("input", () => clearFieldError(input.id));
  }
}

function setUpApiKey() {
  const input = $("api_key");
  input.value = localStorage.getItem(KEY_STORAGE) || "";
  input.addEventListener("input", () => {
    if (input.value.trim()) localStorage.setItem(KEY_STORAGE, input.value.trim());
    else localStorage.removeItem(KEY_STORAGE);
  });
}

async function checkHealth() {
  const line = $("server-state");
  try {
    const response = await fetch(pageUrl("health"));
    const body = await readBody(response);
    if (!response.ok || !body || body.status !== "ok") throw new Error(`HTTP ${response.status}`);
    app.appId = body.app_id || DEFAULT_APP_ID;
    const auth = body.auth_required === true;
    $("api_key-field").hidden = !auth;
    line.textContent = `Ready · ${app.appId} · preset ${body.preset || "?"}${auth ? " · API key required" : ""}`;
    line.dataset.state = "ok";
  } catch (err) {
    line.textContent = `Server not ready (${err.message}); retrying…`;
    line.dataset.state = "down";
    setTimeout(checkHealth, HEALTH_RETRY_MS);
  }
}

function main() {
  document.body.dataset.job = "idle";
  setUpApiKey();
  setUpDropZones();
  setUpFieldClearing();
  $("form").addEventListener("submit", onSubmit);
  $("cancel").addEventListener("click", onCancel);
  checkHealth();
}

main();
