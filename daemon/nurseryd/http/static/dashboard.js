// nurseryd dashboard: polls the API it is served by; no framework, no build step.
// Every value from the API is set with textContent, never as HTML.
"use strict";

const TERMINAL = new Set(["completed", "failed", "cancelled", "timed_out"]);
const state = { me: null, paused: false, timer: null, open: null, rejectsFor: null, samples: new Map() };
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

function progressOf(job) {
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
  if (s === null || !isFinite(s)) return "";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function progressText(job) {
  const { rate, eta } = progressOf(job);
  const parts = [job.total ? `${job.processed || 0}/${job.total}` : `${job.processed || 0}`];
  if (job.failed) parts.push(`${job.failed} failed`);
  if (rate !== null && job.status === "running") parts.push(`${rate.toFixed(rate < 10 ? 1 : 0)}/s`);
  if (eta !== null && job.status === "running") parts.push(`ETA ${formatSeconds(eta)}`);
  return parts.join(" · ");
}

function setBar(bar, job) {
  bar.max = job.total || 1;
  bar.value = job.total ? Math.min(job.processed || 0, job.total) : (job.status === "completed" ? 1 : 0);
}

// -- the list -------------------------------------------------------------------------------

function cancelButton(job) {
  const button = el("button", { type: "button", className: "admin-only cancel", textContent: "Cancel" });
  button.addEventListener("click", (event) => { event.stopPropagation(); cancel(job.id); });
  return button;
}

function row(job) {
  const bar = el("progress");
  setBar(bar, job);
  const tr = el("tr", {},
    el("td", { textContent: String(job.id) }),
    el("td", { textContent: job.kind }),
    el("td", {}, el("span", { className: `status ${job.status}`, textContent: job.status })),
    el("td", {}, bar, el("div", { className: "rate", textContent: progressText(job) })),
    el("td", { className: "wide", textContent: new Date(job.created_at).toLocaleString() }),
    el("td", {}, TERMINAL.has(job.status) ? "" : cancelButton(job)));
  tr.dataset.job = String(job.id);
  tr.dataset.status = job.status;
  tr.addEventListener("click", () => openJob(job.id));
  return tr;
}

async function refreshList() {
  const query = new URLSearchParams({ limit: "50" });
  const kind = $("filter-kind").value.trim();
  const status = $("filter-status").value;
  if (kind) query.set("kind", kind);
  if (status) query.set("status", status);
  const page = await api("GET", `/jobs?${query}`);
  $("jobs").tBodies[0].replaceChildren(...page.jobs.map(row));
}

// -- one job --------------------------------------------------------------------------------

async function openJob(id) {
  state.open = id;
  state.rejectsFor = null;
  $("job").hidden = false;
  $("job-rejects").hidden = true;
  await refreshJob();
  $("job").scrollIntoView({ block: "nearest" });
}

function fact(name, value) {
  return [el("dt", { textContent: name }), el("dd", { textContent: value === null || value === undefined ? "—" : String(value) })];
}

async function refreshJob() {
  if (state.open === null) return;
  let job;
  try { job = await api("GET", `/jobs/${state.open}`); } catch (error) {
    if (error.status !== 404) throw error;
    closeJob();  // deleted meanwhile (retention): nothing left to show
    return;
  }
  $("job-id").textContent = `#${job.id} ${job.kind}`;
  $("job-status").textContent = job.status;
  $("job-status").className = `status ${job.status}`;
  setBar($("job-progress"), job);
  $("job-rate").textContent = progressText(job);
  $("job-cancel").hidden = TERMINAL.has(job.status);
  $("job-facts").replaceChildren(
    ...fact("attempts", job.attempts), ...fact("error", job.error),
    ...fact("submitted by", job.submitted_by), ...fact("cancelled by", job.cancelled_by),
    ...fact("created", job.created_at), ...fact("started", job.started_at),
    ...fact("finished", job.finished_at), ...fact("timeout", job.timeout_s && `${job.timeout_s} s`));
  $("job-params").textContent = JSON.stringify(job.params, null, 2);
  $("job-result").textContent = JSON.stringify(job.result, null, 2);
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
  const page = await api("GET", `/jobs/${id}/rejects?limit=100`);
  const box = $("job-rejects");
  box.hidden = page.rejects.length === 0;
  box.querySelector("tbody").replaceChildren(...page.rejects.map((r) => el("tr", {},
    el("td", { textContent: String(r.row) }), el("td", { textContent: r.column || "" }),
    el("td", { textContent: r.reason }),
    el("td", { textContent: r.values === null ? "(hidden)" : JSON.stringify(r.values) }))));
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

// -- actions --------------------------------------------------------------------------------

async function act(what) {
  try { say(await what(), true); } catch (error) { say(error.message); }
  await tick();
}

function cancel(id) {
  return act(async () => { const job = await api("POST", `/jobs/${id}/cancel`); return `job ${id}: ${job.status}`; });
}

function upload(event) {
  event.preventDefault();
  const form = new FormData();
  form.append("file", $("upload-file").files[0]);
  const target = $("upload-target").value.trim();
  if (target) form.append("target", target);
  return act(async () => {
    const job = await api("POST", "/migration/excel", form);
    $("upload-form").reset();
    openJob(job.id);
    return `import started: job ${job.id}`;
  });
}

function fetchNow() {
  return act(async () => { const job = await api("POST", "/fetch", {}); return `fetch started: job ${job.id}`; });
}

// -- polling --------------------------------------------------------------------------------

async function tick() {
  try {
    await refreshList();
    await refreshJob();
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    if (error.status === 401) return showSignIn();
    say(error.message);
  }
}

function schedule() {
  clearTimeout(state.timer);
  if (state.paused || !state.me) return;
  state.timer = setTimeout(async () => { await tick(); schedule(); }, Number($("interval").value));
}

function togglePause() {
  state.paused = !state.paused;
  $("pause").textContent = state.paused ? "Resume" : "Pause";
  $("pause").setAttribute("aria-pressed", String(state.paused));
  schedule();
}

// -- sign-in --------------------------------------------------------------------------------

function showSignIn() {
  state.me = null;
  clearTimeout(state.timer);
  $("console").hidden = true;
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
  $("pause").addEventListener("click", togglePause);
  $("interval").addEventListener("change", schedule);
  $("filter-kind").addEventListener("change", tick);
  $("filter-status").addEventListener("change", tick);
  $("upload-form").addEventListener("submit", upload);
  $("fetch-now").addEventListener("click", fetchNow);
  $("job-close").addEventListener("click", closeJob);
  $("job-cancel").addEventListener("click", () => cancel(state.open));
  $("rejects-csv").addEventListener("click", () => downloadRejects().catch((e) => say(e.message)));
  start();
});
