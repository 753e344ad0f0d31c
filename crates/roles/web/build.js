// The build page: follows /api/build/{key}/events (resuming with Last-Event-ID after a drop,
// never showing a line twice), shows the steps with their durations, the queue position,
// the log by step, and on success downloads the binary and shows how to verify it.
import { api, el, keyFromPath, PLANNED_STEPS, platformName, seconds, stepLabel, STATUS_LABELS } from './common.js';

const $ = (id) => document.getElementById(id);
const key = keyFromPath();
const seen = new Set(); // SSE ids already shown
const steps = new Map(); // step -> { li, time, group, pre, started }
let current = null; // the step running now
let attempt = 0;
let ended = false;
let autoDownload = true;
let build = null;
let queueTimer = null;

function stepItem(step) {
  let s = steps.get(step);
  if (!s) {
    const time = el('span', { class: 'muted small' });
    const li = el('li', { 'data-step': step }, el('span', { text: stepLabel(step) }), time);
    $('steps').append(li);
    s = { li, time, group: null, pre: null, started: null };
    steps.set(step, s);
  }
  return s;
}

function resetSteps() {
  $('steps').replaceChildren();
  steps.clear();
  current = null;
  for (const step of PLANNED_STEPS) stepItem(step);
  updateProgress();
}

function updateProgress() {
  const done = [...steps.values()].filter((s) => s.li.classList.contains('done')).length;
  $('progress').max = Math.max(steps.size, 1);
  $('progress').value = ended && build && build.status === 'complete' ? steps.size : done;
}

function logGroup(step) {
  const s = stepItem(step);
  if (!s.group) {
    s.pre = el('pre', { 'data-step': step });
    const label = attempt > 1 ? `${stepLabel(step)} (attempt ${attempt})` : stepLabel(step);
    s.group = el('details', { open: true }, el('summary', { text: label }), s.pre);
    // Earlier steps fold away when a new one starts.
    for (const d of $('log').querySelectorAll('details')) d.open = false;
    $('log').append(s.group);
  }
  return s;
}

function appendLine(step, line) {
  const target = step ? logGroup(step).pre : generalLog();
  const atBottom = target.scrollHeight - target.scrollTop - target.clientHeight < 40;
  target.append(line + '\n');
  if (atBottom) target.scrollTop = target.scrollHeight;
}

function generalLog() {
  let pre = $('log').querySelector('pre[data-step=""]');
  if (!pre) {
    pre = el('pre', { 'data-step': '' });
    $('log').append(el('details', { open: true }, el('summary', { text: 'Build' }), pre));
  }
  return pre;
}

function startStep(step) {
  if (current && current !== step) finishStep(current);
  const s = stepItem(step);
  s.li.classList.remove('done', 'failed');
  s.li.classList.add('current');
  s.li.setAttribute('aria-current', 'step');
  s.started = performance.now();
  current = step;
  logGroup(step);
  updateProgress();
}

function finishStep(step, duration) {
  const s = stepItem(step);
  s.li.classList.remove('current');
  s.li.removeAttribute('aria-current');
  s.li.classList.add('done');
  if (duration !== undefined) s.time.textContent = seconds(duration * 1000);
  else if (s.started !== null && !s.time.textContent) s.time.textContent = seconds(performance.now() - s.started);
  updateProgress();
}

function failStep(step) {
  const s = logGroup(step);
  s.li.classList.remove('current', 'done');
  s.li.classList.add('failed');
  for (const d of $('log').querySelectorAll('details')) d.open = false;
  s.group.open = true;
  s.group.scrollIntoView({ block: 'nearest' });
}

function setState(text) {
  $('state').textContent = text;
}

async function pollQueue() {
  clearTimeout(queueTimer);
  if (ended || !build || build.status !== 'queued') return;
  try {
    const b = await api(`/api/build/${key}`);
    if (b.status === 'queued') {
      setState(b.queue_position !== undefined && b.queue_position !== null
        ? `Queued: ${b.queue_position === 0 ? 'next in line' : `${b.queue_position} build${b.queue_position === 1 ? '' : 's'} ahead`}`
        : 'Queued');
    }
  } catch (_) { /* the stream tells the rest */ }
  queueTimer = setTimeout(pollQueue, 3000);
}

function onState(d) {
  build = { ...(build || {}), status: d.status };
  switch (d.status) {
    case 'queued':
      setState(d.reason === 'retry' ? 'Queued again for another attempt' : 'Queued');
      pollQueue();
      break;
    case 'running':
      if (d.attempt > 1 && d.attempt !== attempt) {
        attempt = d.attempt;
        resetSteps();
        appendLine(null, `--- attempt ${d.attempt} ---`);
      }
      attempt = d.attempt;
      setState(attempt > 1 ? `Building (attempt ${attempt})` : 'Building');
      break;
    case 'failed':
      if (d.step) failStep(d.step);
      setState(d.retryable ? `Attempt failed (${d.error}); it will be retried` : 'Failed');
      break;
    default:
      setState(STATUS_LABELS[d.status] || d.status);
  }
}

function onLog(d) {
  const m = d.line.match(/^step (\S+) finished in ([0-9.]+)s/);
  if (m && steps.has(m[1])) {
    // The step's summary: its duration, and the last line of its output.
    finishStep(m[1], parseFloat(m[2]));
    appendLine(m[1], d.line);
    if (current === m[1]) current = null;
    return;
  }
  appendLine(current, d.line);
}

async function showVerification(sha256) {
  const file = build && build.request && build.request.os === 'windows' ? 'caddy.exe' : 'caddy';
  const base = `/api/build/${key}`;
  $('download-link').href = `${base}/download`;
  $('sig-link').href = `${base}/download.minisig`;
  $('sum-link').href = `${base}/download.sha256`;
  $('prov-link').href = `${base}/provenance`;
  $('prov-sig-link').href = `${base}/provenance.minisig`;
  $('verify-sha256').textContent = `echo "${sha256}  ${file}" | sha256sum -c -`;
  let publicKey = '<public key: GET /api/public-key>';
  try {
    const resp = await fetch('/api/public-key');
    if (resp.ok) {
      const lines = (await resp.text()).trim().split('\n');
      publicKey = lines[lines.length - 1].trim();
    }
  } catch (_) { /* shown as a hint */ }
  $('verify-minisign').textContent =
    `curl -fsSLo ${file}.minisig ${location.origin}${base}/download.minisig\nminisign -Vm ${file} -P ${publicKey}`;
  $('verify').hidden = false;
  try {
    showReproduction((await api(base)).reproduction);
  } catch (_) { /* the check is optional */ }
}

/** The build's reproducibility check: another worker built the request again. */
function showReproduction(r) {
  const p = $('reproduction');
  if (!r) return;
  p.replaceChildren();
  p.className = 'small';
  const worker = r.worker || 'another worker';
  if (r.status === 'matched') {
    p.append(`Reproduced: ${worker} built the same bytes independently. `);
    if (r.provenance) {
      const a = document.createElement('a');
      a.href = r.provenance;
      a.textContent = 'Its signed statement';
      p.append(a);
    }
  } else if (r.status === 'mismatched') {
    p.className = 'small error';
    p.append(`Warning: a second worker (${worker}) built other bytes for this request. ${r.message || ''}`);
  } else if (r.status === 'failed') {
    p.append(`The reproducibility check could not finish: ${r.message || 'no reason given'}`);
  } else {
    p.append('A second worker is checking that it builds the same bytes.');
  }
  p.hidden = false;
}

function onResult(d) {
  ended = true;
  clearTimeout(queueTimer);
  if (d.success) {
    if (current) finishStep(current);
    build = { ...(build || {}), status: 'complete' };
    for (const s of steps.values()) if (!s.li.classList.contains('done')) s.li.hidden = !s.group;
    updateProgress();
    setState('Succeeded');
    $('result').className = 'ok';
    $('result').textContent = `Done: ${(d.size / 1048576).toFixed(1)} MiB, sha256 ${d.sha256}`;
    showVerification(d.sha256);
    if (autoDownload) location.assign(`/api/build/${key}/download`);
  } else {
    if (current) failStep(current);
    setState('Failed');
    $('result').className = 'error';
    $('result').textContent = d.error || 'The build failed.';
  }
}

/** The stream closed for good without a result: the download tells success from failure. */
async function settle() {
  if (ended) return;
  try {
    const head = await fetch(`/api/build/${key}/download`, { method: 'HEAD' });
    if (head.ok) {
      const b = await api(`/api/build/${key}`);
      build = b;
      onResult({ success: true, sha256: b.artifact ? b.artifact.sha256 : '', size: b.artifact ? b.artifact.size : 0 });
      return;
    }
    const b = await api(`/api/build/${key}`);
    build = b;
    if (['failed', 'gave_up', 'cancelled', 'expired'].includes(b.status)) {
      onResult({ success: false, error: b.error ? b.error.message : STATUS_LABELS[b.status] });
    } else {
      setState('The connection was lost; reload the page to follow the build again.');
    }
  } catch (e) {
    setState(`The connection was lost: ${e.message}`);
  }
}

function follow() {
  const source = new EventSource(`/api/build/${key}/events`);
  const once = (handler) => (ev) => {
    if (ev.lastEventId) {
      if (seen.has(ev.lastEventId)) return;
      seen.add(ev.lastEventId);
    }
    let data;
    try { data = JSON.parse(ev.data); } catch (_) { return; }
    handler(data);
  };
  source.addEventListener('state', once(onState));
  source.addEventListener('step', once((d) => startStep(d.step)));
  source.addEventListener('log', once(onLog));
  source.addEventListener('result', once((d) => { source.close(); onResult(d); }));
  source.addEventListener('open', () => { if (!ended && $('state').dataset.lost) { delete $('state').dataset.lost; } });
  source.addEventListener('error', () => {
    if (ended) return;
    if (source.readyState === EventSource.CLOSED) {
      settle();
    } else {
      // The browser reconnects by itself, sending Last-Event-ID: nothing is replayed twice.
      $('state').dataset.lost = '1';
      setState('Connection lost; reconnecting…');
    }
  });
}

async function main() {
  if (!key) {
    setState('');
    $('result').className = 'error';
    $('result').textContent = 'This is not a build page: the address should be /build/ followed by a 64-character build key.';
    return;
  }
  $('history-link').href = `/build/${key}/history`;
  resetSteps();
  try {
    build = await api(`/api/build/${key}`);
  } catch (e) {
    setState('');
    $('result').className = 'error';
    $('result').textContent = e.status === 404 ? 'No build has this key.' : e.message;
    return;
  }
  const r = build.request;
  const plugins = r.plugins.map((p) => `${p.module}@${p.version}`);
  $('title').textContent = `Caddy ${r.caddy_version} for ${platformName(r)}`;
  document.title = `Build: Caddy ${r.caddy_version} for ${platformName(r)}`;
  $('summary').textContent = plugins.length ? `With ${plugins.join(', ')}` : 'Without plugins';
  // Opening the page of a finished build shows it; only a build watched to its end downloads.
  autoDownload = build.status !== 'complete';
  follow();
}

main();
