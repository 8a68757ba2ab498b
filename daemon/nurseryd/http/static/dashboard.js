// nurseryd dashboard: follows the daemon's event stream (GET /events), asks the API
// again when something changed, and polls when the stream is down; no framework,
// no build step. Every value from the API is set with textContent, never as HTML.
"use strict";

const TERMINAL = new Set(["completed", "failed", "cancelled", "timed_out"]);
const ACTIVE = ["queued", "running"];
const RETRYABLE = ["failed", "cancelled", "timed_out"];
const DURABLE_EVENTS = ["created", "started", "requeued", "retried", "finished"];
// Jobs one bulk request acts on at most (MAX_BULK in http/actions.py).
const MAX_BULK = 10000;
const REJECTS_PAGE = 100;
// How long to wait before opening a stream again after the server closed it.
const STREAM_RETRY_MS = 10000;

const state = {
  me: null, paused: false, view: "jobs", timer: null, samples: new Map(),
  open: null, rejectsFor: null, rejectPages: [0], rejectsNext: null,
  stream: null, live: false, streamRetryAt: 0, dirty: true, jobDirty: false,
  bulk: null, options: null,
};
const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children) node.append(child);
  return node;
}

function say(text, ok) {
  const box = $("message");
  box.textContent = text;
  box.className = ok ? "ok" : "";
  box.hidden = !text;
}

// Every write is JSON with its Content-Type, or multipart for the upload; the
// browser adds Origin, which is how a session proves the write is same-origin.
async function api(method, path, body) {
  const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (!response.ok) {
    const error = new Error((data && data.detail) || `${method} ${path}: ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

// -- progress, rate and ETA -----------------------------------------------------------------

// A job from the event stream carries the daemon's rate and eta_s; one from a poll
// gets them measured here, between two polls.
function progressOf(job) {
  if (job.rate !== undefined) return { rate: job.rate, eta: job.eta_s };
  const now = Date.now() / 1000;
  let sample = state.samples.get(job.id);
  if (job.status !== "running") { state.samples.delete(job.id); sample = null; }
  else if (!sample || job.processed < sample.processed) {
    sample = { t: now, processed: job.processed || 0 };
    state.samples.set(job.id, sample);
  }
  let rate = null;
  if (sample && now - sample.t >= 1) rate = ((job.processed || 0) - sample.processed) / (now - sample.t);
  else if (job.status === "running" && job.started_at) {
    const since = now - Date.parse(job.started_at) / 1000;
    if (since > 0.5) rate = (job.processed || 0) / since;
  }
  const left = job.total ? job.total - (job.processed || 0) : null;
  const eta = rate && rate > 0 && left !== null ? left / rate : null;
  return { rate, eta };
}

function formatSeconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function progressText(job) {
  const { rate, eta } = progressOf(job);
  const parts = [job.total ? `${job.processed || 0}/${job.total}` : `${job.processed || 0}`];
  if (job.failed) parts.push(`${job.failed} failed`);
  if (rate !== null && rate !== undefined && job.status === "running") parts.push(`${rate.toFixed(rate < 10 ? 1 : 0)}/s`);
  if (eta !== null && eta !== undefined && job.status === "running") parts.push(`ETA ${formatSeconds(eta)}`);
  return parts.join(" · ");
}

function setBar(bar, job) {
  bar.max = job.total || 1;
  bar.value = job.total ? Math.min(job.processed || 0, job.total) : (job.status === "completed" ? 1 : 0);
}

function when(value) {
  return value ? new Date(value).toLocaleString() : "—";
}

// -- the list -------------------------------------------------------------------------------

function actionButton(job) {
  if (ACTIVE.includes(job.status)) {
    const button = el("button", { type: "button", className: "admin-only cancel", textContent: "Cancel" });
    button.addEventListener("click", (event) => { event.stopPropagation(); cancel(job.id); });
    return button;
  }
  if (RETRYABLE.includes(job.status)) {
    const button = el("button", { type: "button", className: "admin-only retry", textContent: "Retry" });
    button.addEventListener("click", (event) => { event.stopPropagation(); retry(job.id); });
    return button;
  }
  return "";
}

function newRow(id) {
  const tr = el("tr", {}, el("td", { textContent: String(id) }), el("td"),
    el("td", {}, el("span", { className: "status" })),
    el("td", {}, el("progress"), el("div", { className: "rate" })),
    el("td", { className: "wide" }), el("td"));
  tr.dataset.job = String(id);
  tr.addEventListener("click", () => openJob(id));
  return tr;
}

// Updates a row in place (a progress event comes four times a second): the
// action cell is rebuilt only when the status changed, so a button is never
// replaced under the pointer.
function fillRow(tr, job) {
  const cells = tr.cells;
  cells[1].textContent = job.kind;
  const status = cells[2].firstChild;
  status.textContent = job.status;
  status.className = `status ${job.status}`;
  setBar(cells[3].firstChild, job);
  cells[3].lastChild.textContent = progressText(job);
  cells[4].textContent = when(job.created_at);
  if (tr.dataset.status !== job.status) cells[5].replaceChildren(actionButton(job));
  tr.dataset.status = job.status;
}

function rowOf(id) {
  return $("jobs").querySelector(`tbody tr[data-job="${Number(id)}"]`);
}

function filters() {
  const kind = $("filter-kind").value.trim();
  const status = $("filter-status").value;
  const since = $("filter-since").value;
  return {
    kind, statuses: status ? status.split(",") : [],
    since: since ? new Date(Date.now() - Number(since) * 1000).toISOString() : "",
  };
}

async function refreshList() {
  const { kind, statuses, since } = filters();
  const query = new URLSearchParams({ limit: "50" });
  if (kind) query.set("kind", kind);
  if (statuses.length) query.set("status", statuses.join(","));
  if (since) query.set("since", since);
  const page = await api("GET", `/jobs?${query}`);
  const body = $("jobs").tBodies[0];
  const known = new Map([...body.rows].map((tr) => [Number(tr.dataset.job), tr]));
  body.replaceChildren(...page.jobs.map((job) => {
    const tr = known.get(job.id) || newRow(job.id);
    fillRow(tr, job);
    return tr;
  }));
}

// -- bulk cancel and retry of the list's filter -------------------------------------------

function bulkPlan(action) {
  const { kind, statuses, since } = filters();
  const allowed = action === "cancel" ? ACTIVE : RETRYABLE;
  const verb = action === "cancel" ? "cancelled" : "retried";
  if (since) return { reason: "set Created to any time first: bulk actions act on kind and status only" };
  if (!kind && !statuses.length) return { reason: "choose a kind or a status first: bulk actions never act on every job" };
  const chosen = statuses.length ? statuses.filter((s) => allowed.includes(s)) : allowed;
  if (!chosen.length) return { reason: `${statuses.join(", ")} jobs cannot be ${verb}` };
  const query = new URLSearchParams();
  if (kind) query.set("kind", kind);
  query.set("status", chosen.join(","));
  return { action, kind, statuses: chosen, query: query.toString() };
}

function updateBulk() {
  const reasons = new Set();
  for (const action of ["cancel", "retry"]) {
    const plan = bulkPlan(action);
    const button = $(`bulk-${action}`);
    button.disabled = Boolean(plan.reason);
    button.title = plan.reason || "";
    if (plan.reason) reasons.add(plan.reason);
  }
  $("bulk-note").textContent = [...reasons].join("; ");
  hideConfirm();
}

// How many jobs the action would touch: every page of GET /jobs for its filter.
async function countMatching(query) {
  let count = 0;
  let next = `/jobs?${query}&limit=500`;
  while (next && count < MAX_BULK) {
    const page = await api("GET", next);
    count += page.jobs.length;
    next = page.next;
  }
  return { count: Math.min(count, MAX_BULK), more: Boolean(next) };
}

async function askBulk(action) {
  const plan = bulkPlan(action);
  if (plan.reason) return say(plan.reason);
  try {
    const { count, more } = await countMatching(plan.query);
    const what = `${plan.kind ? `${plan.kind} ` : ""}job${count === 1 ? "" : "s"} (${plan.statuses.join(", ")})`;
    if (count === 0) return say(`no ${what} to ${action}`);
    const verb = action === "cancel" ? "Cancel" : "Retry";
    const number = `${count}${more ? "+" : ""}`;
    state.bulk = plan;
    $("confirm-text").textContent = `${verb} ${number} ${what}?` +
      (more ? ` At most ${MAX_BULK} are acted on per request.` : "");
    $("confirm-yes").textContent = `${verb} ${number} job${count === 1 ? "" : "s"}`;
    $("confirm").hidden = false;
    $("confirm-no").focus();
  } catch (error) { say(error.message); }
}

function hideConfirm() {
  state.bulk = null;
  $("confirm").hidden = true;
}

function runBulk() {
  const plan = state.bulk;
  hideConfirm();
  if (!plan) return;
  return act(async () => {
    const answer = await api("POST", `/jobs/${plan.action}?${plan.query}`);
    const verbed = plan.action === "cancel" ? "cancelled" : "retried";
    let text = `${verbed} ${answer.affected} of ${answer.matched} matching job${answer.matched === 1 ? "" : "s"}`;
    if (answer.skipped) text += `; ${answer.skipped} skipped (changed meanwhile)`;
    if (answer.stopped) text += `; ${answer.stopped}`;
    if (answer.more) text += "; more matched: run it again for the rest";
    return text;
  });
}

// -- one job --------------------------------------------------------------------------------

async function openJob(id) {
  state.open = id;
  state.rejectsFor = null;
  state.rejectPages = [0];
  $("job").hidden = false;
  $("job-rejects").hidden = true;
  $("job-log").replaceChildren();
  await refreshJob();
  $("job").scrollIntoView({ block: "nearest" });
}

function fact(name, value) {
  return [el("dt", { textContent: name }), el("dd", { textContent: value === null || value === undefined ? "—" : String(value) })];
}

// What a progress event changes: status, bar, rate and the buttons.
function showJobHead(job) {
  $("job-id").textContent = `#${job.id} ${job.kind}`;
  $("job-status").textContent = job.status;
  $("job-status").className = `status ${job.status}`;
  setBar($("job-progress"), job);
  $("job-rate").textContent = progressText(job);
  $("job-cancel").hidden = !ACTIVE.includes(job.status);
  $("job-retry").hidden = !RETRYABLE.includes(job.status);
}

async function refreshJob() {
  state.jobDirty = false;
  if (state.open === null) return;
  const id = state.open;
  let job;
  try { job = await api("GET", `/jobs/${id}`); } catch (error) {
    if (error.status !== 404) throw error;
    closeJob();  // deleted meanwhile (retention): nothing left to show
    return;
  }
  if (state.open !== id) return;
  showJobHead(job);
  $("job-facts").replaceChildren(
    ...fact("attempts", job.attempts), ...fact("error", job.error),
    ...fact("submitted by", job.submitted_by), ...fact("cancelled by", job.cancelled_by),
    ...fact("created", when(job.created_at)), ...fact("started", job.started_at && when(job.started_at)),
    ...fact("finished", job.finished_at && when(job.finished_at)),
    ...fact("timeout", job.timeout_s && `${job.timeout_s} s`));
  $("job-params").textContent = JSON.stringify(job.params, null, 2);
  $("job-result").textContent = JSON.stringify(job.result, null, 2);
  const log = await api("GET", `/jobs/${id}/log?limit=200`);
  $("job-log").replaceChildren(...log.lines.map((line) => el("li", { className: line.level },
    el("time", { textContent: new Date(line.at).toLocaleTimeString() }), " ", line.message)));
  // Rejects only grow while the job runs: once it has ended they are read once.
  const ended = TERMINAL.has(job.status);
  if (job.kind === "migration" && job.failed && state.rejectsFor !== job.id) {
    await showRejects(job.id);
    if (ended) state.rejectsFor = job.id;
  }
}

function closeJob() {
  state.open = null;
  state.rejectsFor = null;
  $("job").hidden = true;
}

async function showRejects(id) {
  const after = state.rejectPages[state.rejectPages.length - 1];
  const page = await api("GET", `/jobs/${id}/rejects?limit=${REJECTS_PAGE}&after=${after}`);
  const box = $("job-rejects");
  box.hidden = page.rejects.length === 0 && state.rejectPages.length === 1;
  box.querySelector("tbody").replaceChildren(...page.rejects.map((r) => el("tr", {},
    el("td", { textContent: String(r.row) }), el("td", { textContent: r.column || "" }),
    el("td", { textContent: r.reason }),
    el("td", { textContent: r.values === null ? "(hidden)" : JSON.stringify(r.values) }))));
  state.rejectsNext = page.next && page.rejects.length ? page.rejects[page.rejects.length - 1].row : null;
  $("rejects-next").disabled = state.rejectsNext === null;
  $("rejects-prev").disabled = state.rejectPages.length === 1;
  const first = (state.rejectPages.length - 1) * REJECTS_PAGE + 1;
  $("rejects-page").textContent = page.rejects.length
    ? `${first}–${first + page.rejects.length - 1} of ${page.failed}` : "";
}

function pageRejects(step) {
  if (state.open === null) return;
  if (step > 0 && state.rejectsNext !== null) state.rejectPages.push(state.rejectsNext);
  else if (step < 0 && state.rejectPages.length > 1) state.rejectPages.pop();
  else return;
  showRejects(state.open).catch((error) => say(error.message));
}

function csvCell(value) {
  const text = value === null || value === undefined ? "" : typeof value === "string" ? value : JSON.stringify(value);
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

// All rejects, page after page, into one CSV built here (the API stays JSON).
async function downloadRejects() {
  const id = state.open;
  const lines = [["row", "column", "reason", "values"].join(",")];
  let next = `/jobs/${id}/rejects?limit=500`;
  while (next) {
    const page = await api("GET", next);
    for (const r of page.rejects) lines.push([r.row, r.column, r.reason, r.values].map(csvCell).join(","));
    next = page.next;
  }
  const url = URL.createObjectURL(new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv" }));
  const link = el("a", { href: url, download: `job-${id}-rejects.csv` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// -- the fetch page -------------------------------------------------------------------------

// A source's card: what the last fetches recorded about it (kept across fetches),
// and what the latest fetch job did with it (its result, also for a source that
// fetch cut off: an interrupted source records nothing of its own).
function sourceCard(source, job) {
  const run = job && job.result && job.result.sources ? job.result.sources[source.name] : null;
  const outcome = source.last_outcome || "never fetched";
  const card = el("li", { className: "source" },
    el("p", {}, el("strong", { textContent: source.name }), " ",
      el("span", { className: `outcome ${source.last_outcome || "none"}`, textContent: outcome })),
    el("dl", {},
      ...fact("url", source.url), ...fact("format", source.format),
      ...fact("HTTP status", source.last_status),
      ...fact("last job", source.last_job_id && `#${source.last_job_id}`),
      ...fact("last success", source.last_success_at && when(source.last_success_at)),
      ...fact("last error", source.last_error && `${source.last_error} (${when(source.last_error_at)})`),
      ...(run ? fact(`job #${job.id}`, `${run.outcome}: ${run.new} new, ${run.updated} updated, ` +
        `${run.unchanged} unchanged${run.error ? ` (${run.error})` : ""}`) : [])));
  card.dataset.source = source.name;
  card.dataset.outcome = source.last_outcome || "";
  card.dataset.run = run ? run.outcome : "";
  return card;
}

async function refreshFetch() {
  const status = await api("GET", "/fetch");
  const job = status.job;
  const schedule = status.schedule.interval_s
    ? `runs every ${formatSeconds(status.schedule.interval_s)}` : "runs when asked";
  $("fetch-summary").textContent = job
    ? `${status.active ? "Fetch" : "Last fetch"}: job #${job.id}, ${job.status} (${progressText(job)}); ${schedule}.`
    : `No fetch has run yet; ${schedule}.`;
  $("fetch-summary").dataset.status = job ? job.status : "";
  $("fetch-cancel").hidden = !status.active;
  $("fetch-none").hidden = status.sources.length > 0;
  $("fetch-sources").replaceChildren(...status.sources.map((source) => sourceCard(source, job)));
}

// -- imports --------------------------------------------------------------------------------

function fillSelect(select, names, chosen) {
  select.replaceChildren(...names.map((name) => el("option", { value: name, textContent: name, selected: name === chosen })));
}

async function loadOptions() {
  const options = await api("GET", "/dashboard/options");
  state.options = options;
  for (const select of document.querySelectorAll("select.targets")) fillSelect(select, options.targets, options.default_target);
  fillSelect($("database-source"), options.database_sources);
  const noDatabase = options.database_sources.length === 0;
  $("database-none").hidden = !noDatabase;
  for (const field of $("database-form").elements) field.disabled = noDatabase;
  fillSelect($("sheets-spreadsheet"), options.spreadsheets);
  const noSheets = !options.google_sheets || options.spreadsheets.length === 0;
  $("sheets-none").hidden = !noSheets;
  for (const field of $("sheets-form").elements) field.disabled = noSheets;
}

function started(job, what) {
  showView("jobs");
  openJob(job.id);
  return `${what} started: job ${job.id}`;
}

function upload(event) {
  event.preventDefault();
  const form = new FormData();
  form.append("file", $("upload-file").files[0]);
  const target = $("upload-target").value;
  if (target) form.append("target", target);
  return act(async () => {
    const job = await api("POST", "/migration/excel", form);
    $("upload-form").reset();
    return started(job, "import");
  });
}

function importDatabase(event) {
  event.preventDefault();
  return act(async () => started(await api("POST", "/migration/database", {
    source_identifier: $("database-source").value, target: $("database-target").value,
  }), "database import"));
}

function importSheet(event) {
  event.preventDefault();
  const body = { spreadsheet: $("sheets-spreadsheet").value, target: $("sheets-target").value };
  const range = $("sheets-range").value.trim();
  if (range) body.range = range;
  return act(async () => started(await api("POST", "/migration/google-sheets", body), "Google Sheets import"));
}

// -- actions --------------------------------------------------------------------------------

async function act(what) {
  try { say(await what(), true); } catch (error) { say(error.message); }
  state.dirty = true;
  await tick();
}

function cancel(id) {
  return act(async () => { const job = await api("POST", `/jobs/${id}/cancel`); return `job ${id}: ${job.status}`; });
}

function retry(id) {
  return act(async () => { const job = await api("POST", `/jobs/${id}/retry`); return `job ${id} retried: ${job.status}`; });
}

function fetchNow() {
  return act(async () => { const job = await api("POST", "/fetch", {}); return `fetch started: job ${job.id}`; });
}

function cancelFetch() {
  return act(async () => { const job = await api("POST", "/fetch/cancel"); return `fetch job ${job.id}: ${job.status}`; });
}

// -- live updates: the event stream, polling as the fallback ------------------------------

// Status changes say "ask again" (at most once per interval); progress events move
// the bars at once. An EventSource reconnects by itself and sends Last-Event-ID,
// so the daemon replays the status changes it missed.
function openStream() {
  closeStream();
  if (state.paused || !state.me || typeof EventSource === "undefined") return;
  const source = new EventSource("/events");
  state.stream = source;
  source.onopen = () => { state.live = true; state.dirty = true; showFeed(); };
  source.onerror = () => {
    state.live = false;
    if (source.readyState === EventSource.CLOSED && state.stream === source) {
      state.stream = null;  // refused (401, 503 ...): poll, and try again later
      state.streamRetryAt = Date.now() + STREAM_RETRY_MS;
    }
    showFeed();
  };
  for (const name of DURABLE_EVENTS) source.addEventListener(name, (event) => onEvent(event, true));
  source.addEventListener("progress", (event) => onEvent(event, false));
}

function closeStream() {
  if (state.stream) state.stream.close();
  state.stream = null;
  state.live = false;
}

function onEvent(event, durable) {
  let job;
  try { job = JSON.parse(event.data); } catch (e) { return; }
  const tr = rowOf(job.id);
  if (tr) fillRow(tr, job);
  if (job.id === state.open) {
    showJobHead(job);
    if (durable) state.jobDirty = true;
  }
  // A fetch records each source's outcome as it goes: its progress changes the fetch page.
  if (durable || (job.kind === "fetch" && state.view === "fetch")) state.dirty = true;
}

function showFeed() {
  $("feed").textContent = state.paused ? "paused" : state.live ? "live" : `polling every ${Number($("interval").value) / 1000} s`;
  $("feed").className = `note ${state.paused ? "paused" : state.live ? "live" : "polling"}`;
}

async function tick() {
  state.dirty = false;
  try {
    if (state.view === "jobs") {
      await refreshList();
      await refreshJob();
    } else if (state.view === "fetch") {
      await refreshFetch();
    }
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    if (error.status === 401) return showSignIn();
    say(error.message);
  }
}

// Every interval: with the stream up, ask only if an event said something changed;
// without it, ask anyway.
async function pulse() {
  if (!state.stream && Date.now() >= state.streamRetryAt) openStream();
  if (!state.live || state.dirty) await tick();
  else if (state.jobDirty && state.view === "jobs") {
    try { await refreshJob(); } catch (error) { say(error.message); }
  }
}

function schedule() {
  clearTimeout(state.timer);
  showFeed();
  if (state.paused || !state.me) return;
  state.timer = setTimeout(async () => { await pulse(); schedule(); }, Number($("interval").value));
}

function togglePause() {
  state.paused = !state.paused;
  $("pause").textContent = state.paused ? "Resume" : "Pause";
  $("pause").setAttribute("aria-pressed", String(state.paused));
  if (state.paused) closeStream();
  else {
    openStream();
    tick();
  }
  schedule();
}

function showView(name) {
  state.view = name;
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `view-${name}`;
  for (const button of $("nav").querySelectorAll("button")) {
    if (button.dataset.view === name) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  state.dirty = true;
  if (name !== "import") tick();
}

function filtersChanged() {
  updateBulk();
  tick();
}

// -- sign-in --------------------------------------------------------------------------------

function showSignIn() {
  state.me = null;
  clearTimeout(state.timer);
  closeStream();
  $("console").hidden = true;
  $("nav").hidden = true;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  $("sign-in").hidden = false;
}

function showConsole(me) {
  state.me = me;
  document.body.classList.toggle("read-only", me.role !== "admin");
  $("who").textContent = me.via === "loopback" ? "local (no token configured)" : `${me.name} (${me.role})`;
  $("sign-out").hidden = me.via !== "cookie";
  $("sign-in").hidden = true;
  $("console").hidden = false;
  $("nav").hidden = false;
  if (me.role !== "admin" && state.view === "import") showView("jobs");
  updateBulk();
  loadOptions().catch((error) => say(error.message));
  openStream();
  tick().then(schedule);
}

async function start() {
  try { showConsole(await api("GET", "/session")); } catch (error) {
    if (error.status === 401) showSignIn(); else say(error.message);
  }
}

async function signIn(event) {
  event.preventDefault();
  try {
    const me = await api("POST", "/session", { token: $("token").value });
    $("token").value = "";
    say("");
    showConsole(me);
  } catch (error) { say(error.message); }
}

async function signOut() {
  await api("POST", "/session/logout");
  showSignIn();
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  for (const button of $("nav").querySelectorAll("button")) {
    button.addEventListener("click", () => showView(button.dataset.view));
  }
  $("pause").addEventListener("click", togglePause);
  $("interval").addEventListener("change", schedule);
  $("filter-kind").addEventListener("change", filtersChanged);
  $("filter-status").addEventListener("change", filtersChanged);
  $("filter-since").addEventListener("change", filtersChanged);
  $("bulk-cancel").addEventListener("click", () => askBulk("cancel"));
  $("bulk-retry").addEventListener("click", () => askBulk("retry"));
  $("confirm-yes").addEventListener("click", runBulk);
  $("confirm-no").addEventListener("click", () => { hideConfirm(); say(""); });
  $("upload-form").addEventListener("submit", upload);
  $("database-form").addEventListener("submit", importDatabase);
  $("sheets-form").addEventListener("submit", importSheet);
  $("fetch-now").addEventListener("click", fetchNow);
  $("fetch-cancel").addEventListener("click", cancelFetch);
  $("job-close").addEventListener("click", closeJob);
  $("job-cancel").addEventListener("click", () => cancel(state.open));
  $("job-retry").addEventListener("click", () => retry(state.open));
  $("rejects-prev").addEventListener("click", () => pageRejects(-1));
  $("rejects-next").addEventListener("click", () => pageRejects(1));
  $("rejects-csv").addEventListener("click", () => downloadRejects().catch((e) => say(e.message)));
  start();
});
