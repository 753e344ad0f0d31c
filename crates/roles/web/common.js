// What the pages share: JSON requests with the api's error shape, step labels, formatting.

/** GETs or POSTs `path` and returns the envelope's `result`; throws an Error carrying the
 *  api's message (and the HTTP status) otherwise. */
export async function api(path, options = {}) {
  let resp;
  try {
    resp = await fetch(path, { headers: { accept: 'application/json' }, ...options });
  } catch (e) {
    throw Object.assign(new Error('the server cannot be reached; check your connection and try again'), { status: 0 });
  }
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON */ }
  if (!resp.ok) {
    const message = body && body.error && body.error.message ? body.error.message : `HTTP ${resp.status}`;
    throw Object.assign(new Error(message), { status: resp.status });
  }
  return body ? body.result : null;
}

/** Human labels of the worker's steps (caddyserver.com's names where it has them). */
export const STEP_LABELS = {
  create_environment: 'Setting up build environment',
  initialize_module: 'Initializing Go module',
  pin_versions: 'Downloading dependencies',
  windows_resources: 'Adding Windows resources',
  tidy_module: 'Resolving modules',
  compile: 'Compiling',
  verify: 'Verifying the binary',
  cleanup: 'Cleaning up',
  publish: 'Signing and storing',
};

/** The steps every build goes through, in order (the worker's build plan); a step the
 *  stream names that is not here is added where it comes. */
export const PLANNED_STEPS = ['initialize_module', 'pin_versions', 'tidy_module', 'compile'];

export function stepLabel(step) {
  return STEP_LABELS[step] || step;
}

export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'text') e.textContent = v;
    else if (k === 'class') e.className = v;
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

export function platformName(r) {
  if (!r) return '';
  return `${r.os}/${r.arch}${r.arm ? 'v' + r.arm : ''}`;
}

export function seconds(ms) {
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

/** The key from a page path like /build/<key> or /build/<key>/history. */
export function keyFromPath() {
  const m = location.pathname.match(/^\/build\/([0-9a-f]{64})(\/|$)/);
  return m ? m[1] : null;
}

export const STATUS_LABELS = {
  queued: 'Queued',
  running: 'Building',
  complete: 'Succeeded',
  failed: 'Failed',
  gave_up: 'Failed (gave up after retries)',
  cancelled: 'Cancelled',
  expired: 'Expired (binary deleted)',
};
