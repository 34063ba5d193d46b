// Drives the official @fal-ai/client (pinned in package-lock.json) against a self-hosted stable-avatar-serve.
//
//   node fal_client_check.mjs BASE_URL SCENARIO [SCENARIO...] --image PNG --audio WAV --long-audio WAV [--steps N]
//
// BASE_URL may also come from $FAL_BASE_URL. Scenarios: subscribe, streaming, queue, cancel, upload,
// validation, run. Each prints one JSON line {"scenario", "ok", ...observations} on stdout; the pytest side
// (tests/test_fal_clients.py) asserts on them, so this script only records what the client saw. It exits 1
// when a scenario hit an unexpected error (the line then has "ok": false and "error").
//
// The client hard-codes https://queue.fal.run, https://fal.run and https://rest.fal.ai; the documented hook to
// point it elsewhere is requestMiddleware (reference §2.2.3). Sync `run` goes to fal.run, which this server
// serves under /run/, so that host maps to BASE/run. The storage PUT bypasses the middleware (it uses the
// presigned upload_url as is), which is part of what the upload scenario checks.
import { readFileSync } from "node:fs";
import { basename } from "node:path";
import { ApiError, ValidationError, createFalClient } from "@fal-ai/client";

const APP = "fal-ai/stable-avatar";

function parseArgs(argv) {
  const opts = { scenarios: [], image: null, audio: null, long_audio: null, steps: 2 };
  const positional = [];
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    if (["--image", "--audio", "--long-audio", "--steps"].includes(flag)) opts[flag.slice(2).replace("-", "_")] = argv[++i];
    else positional.push(flag);
  }
  let base = process.env.FAL_BASE_URL;
  if (positional[0] && /^https?:\/\//.test(positional[0])) base = positional.shift();
  if (!base) throw new Error("usage: fal_client_check.mjs BASE_URL SCENARIO... --image PNG --audio WAV --long-audio WAV");
  opts.base = base.replace(/\/$/, "");
  opts.scenarios = positional;
  opts.steps = Number(opts.steps);
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
const BASE = opts.base;
const requests = []; // every fetch the client made: [method, url] (the PUT of an upload included)
let lastSubmitBody = null;

async function recordingFetch(input, init = {}) {
  const url = typeof input === "string" ? input : input.url;
  const method = (init.method || "GET").toUpperCase();
  requests.push([method, url]);
  if (method === "POST" && url.startsWith(`${BASE}/${APP}`) && typeof init.body === "string") {
    lastSubmitBody = JSON.parse(init.body);
  }
  return fetch(input, init);
}

const fal = createFalClient({
  credentials: "anything",
  fetch: recordingFetch,
  requestMiddleware: async (req) => ({
    ...req,
    url: req.url
      .replace(/^https:\/\/queue\.fal\.run/, BASE)
      .replace(/^https:\/\/fal\.run/, `${BASE}/run`)
      .replace(/^https:\/\/rest\.fal\.ai/, BASE),
  }),
});

function file(path) {
  if (!path) throw new Error("--image, --audio and --long-audio are required");
  return readFileSync(path);
}

function dataUri(path, mime) {
  return `data:${mime};base64,${file(path).toString("base64")}`;
}

function input(overrides = {}) {
  return {
    image_url: dataUri(opts.image, "image/png"),
    audio_url: dataUri(opts.audio, "audio/wav"),
    prompt: "a person talking",
    num_inference_steps: opts.steps,
    aspect_ratio: "1:1",
    seed: 7,
    ...overrides,
  };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls queue.status until COMPLETED (the caller's own loop, not subscribe). */
async function waitCompleted(requestId, timeoutMs = 120000) {
  return waitLeftQueue(requestId, ["COMPLETED"], timeoutMs);
}

/** Polls until the request's status is one of `statuses` (a runner claiming a job is asynchronous). */
async function waitLeftQueue(requestId, statuses = ["IN_PROGRESS", "COMPLETED"], timeoutMs = 120000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const status = await fal.queue.status(APP, { requestId, logs: false });
    if (statuses.includes(status.status)) return status;
    if (Date.now() > deadline) throw new Error(`request ${requestId} never reached ${statuses.join("/")}`);
    await sleep(100);
  }
}

/** What a rejected promise carried, for assertions on the Python side. */
async function rejection(promise) {
  try {
    await promise;
    return { rejected: false };
  } catch (error) {
    return {
      rejected: true,
      name: error?.constructor?.name,
      api_error: error instanceof ApiError,
      status: error?.status,
      body: error?.body,
      request_id: error?.requestId,
      validation_error: error instanceof ValidationError,
      field_errors: error instanceof ValidationError ? error.fieldErrors : null,
    };
  }
}

const scenarios = {
  /** fal.subscribe, polling mode: the statuses onQueueUpdate saw and whether IN_PROGRESS carried logs. */
  async subscribe() {
    const statuses = [];
    let enqueued = null;
    let inProgressLogs = 0;
    const result = await fal.subscribe(APP, {
      input: input(),
      logs: true,
      pollInterval: 100,
      onEnqueue: (id) => { enqueued = id; },
      onQueueUpdate: (update) => {
        statuses.push(update.status);
        if (update.status === "IN_PROGRESS") inProgressLogs = Math.max(inProgressLogs, (update.logs || []).length);
      },
    });
    return { statuses, enqueued, in_progress_logs: inProgressLogs, request_id: result.requestId, data: result.data };
  },

  /** fal.subscribe, streaming mode (SSE): the client accumulates each event's new log lines. */
  async streaming() {
    const events = [];
    const result = await fal.subscribe(APP, {
      input: input(),
      logs: true,
      mode: "streaming",
      onQueueUpdate: (update) => {
        events.push({ status: update.status, log_count: (update.logs || []).length });
      },
    });
    const finalLogs = (await fal.queue.status(APP, { requestId: result.requestId, logs: true })).logs || [];
    return {
      events,
      statuses: events.map((e) => e.status),
      log_counts: events.map((e) => e.log_count),
      final_log_count: finalLogs.length,
      request_id: result.requestId,
      data: result.data,
    };
  },

  /** queue.submit / status (logs off and on) / result, driven by hand. */
  async queue() {
    const submitted = await fal.queue.submit(APP, { input: input() });
    const first = await fal.queue.status(APP, { requestId: submitted.request_id, logs: false });
    await waitCompleted(submitted.request_id);
    const withLogs = await fal.queue.status(APP, { requestId: submitted.request_id, logs: true });
    const withoutLogs = await fal.queue.status(APP, { requestId: submitted.request_id, logs: false });
    const result = await fal.queue.result(APP, { requestId: submitted.request_id });
    return {
      submitted,
      first_status: first.status,
      completed: { status: withLogs.status, log_count: withLogs.logs?.length ?? null, metrics: withLogs.metrics },
      completed_without_logs: { status: withoutLogs.status, logs: withoutLogs.logs },
      result_request_id: result.requestId,
      data: result.data,
    };
  },

  /** Three jobs on a one-job server: cancel the queued middle one, then the running first one; cancelling a
   * finished one is a 400. The first job speaks the long audio at 100 steps, so it still runs while the others'
   * positions are read however loaded the machine is; it is cancelled once they are. */
  async cancel() {
    const ids = [(await fal.queue.submit(APP, {
      input: input({ audio_url: dataUri(opts.long_audio, "audio/wav"), num_inference_steps: 100 }),
    })).request_id];
    for (let i = 1; i < 3; i++) ids.push((await fal.queue.submit(APP, { input: input({ seed: i }) })).request_id);
    const [first, middle, last] = ids;
    const firstRunning = await waitLeftQueue(first);
    const before = await fal.queue.status(APP, { requestId: middle, logs: false });
    const lastBefore = await fal.queue.status(APP, { requestId: last, logs: false });
    const cancel = await rejection(fal.queue.cancel(APP, { requestId: middle }));
    const after = await fal.queue.status(APP, { requestId: middle, logs: true });
    const lastAfter = await fal.queue.status(APP, { requestId: last, logs: false });
    const cancelledResult = await rejection(fal.queue.result(APP, { requestId: middle }));
    const cancelRunning = await rejection(fal.queue.cancel(APP, { requestId: first }));
    const firstFinal = await waitCompleted(first);
    await waitCompleted(last);
    const cancelCompleted = await rejection(fal.queue.cancel(APP, { requestId: last }));
    const lastResult = await fal.queue.result(APP, { requestId: last });
    return {
      first_running: firstRunning.status,
      middle_before: { status: before.status, queue_position: before.queue_position },
      last_position_before: lastBefore.queue_position,
      cancel,
      middle_after: { status: after.status, error: after.error, error_type: after.error_type },
      last_after: { status: lastAfter.status, queue_position: lastAfter.queue_position },
      cancelled_result: cancelledResult,
      cancel_running: cancelRunning,
      first_final: { status: firstFinal.status, error_type: firstFinal.error_type },
      cancel_completed: cancelCompleted,
      last_result_has_video: Boolean(lastResult.data?.video?.url),
    };
  },

  /** Blob inputs: transformInput uploads them (initiate + presigned PUT) and submits the returned URLs. */
  async upload() {
    const image = file(opts.image);
    const audio = file(opts.audio);
    const start = requests.length;
    const storedUrl = await fal.storage.upload(new Blob([image], { type: "image/png" }));
    const downloaded = Buffer.from(await (await fetch(storedUrl)).arrayBuffer());
    const uploadRequests = requests.slice(start);
    const result = await fal.subscribe(APP, {
      input: input({
        image_url: new Blob([image], { type: "image/png" }),
        audio_url: new Blob([audio], { type: "audio/wav" }),
      }),
      pollInterval: 100,
    });
    return {
      stored_url: storedUrl,
      round_trip_equal: downloaded.equals(image),
      upload_requests: uploadRequests,
      submitted_urls: { image_url: lastSubmitBody?.image_url, audio_url: lastSubmitBody?.audio_url },
      image_name: basename(opts.image),
      data: result.data,
    };
  },

  /** A 422 becomes ValidationError whose fieldErrors is the server's detail list. */
  async validation() {
    const describe = (body) => rejection(fal.queue.submit(APP, { input: body }));
    const noPrompt = input();
    delete noPrompt.prompt;
    return { zero_steps: await describe(input({ num_inference_steps: 0 })), missing_prompt: await describe(noPrompt) };
  },

  /** fal.run: the synchronous route (fal.run host → BASE/run). */
  async run() {
    const result = await fal.run(APP, { input: input() });
    return { request_id: result.requestId, data: result.data };
  },
};

let failed = false;
for (const name of opts.scenarios) {
  const scenario = scenarios[name];
  let line;
  if (!scenario) {
    line = { scenario: name, ok: false, error: `unknown scenario (known: ${Object.keys(scenarios).join(", ")})` };
  } else {
    try {
      line = { scenario: name, ok: true, ...(await scenario()) };
    } catch (error) {
      line = { scenario: name, ok: false, error: String(error?.stack || error), status: error?.status, body: error?.body };
    }
  }
  failed ||= !line.ok;
  process.stdout.write(`${JSON.stringify(line)}\n`);
}
process.exit(failed ? 1 : 0);
