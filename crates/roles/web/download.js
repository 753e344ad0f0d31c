// The download page: pick plugins, platform and Caddy version; check what `latest` resolves
// to; download at once when built, otherwise follow the build on its page.
import { api, el, platformName } from './common.js';

const $ = (id) => document.getElementById(id);
const state = {
  packages: [],
  selected: new Map(), // module path -> version ('' for latest)
  options: null,
};

/** The platform this browser runs on, as well as it can tell. */
function detectPlatform() {
  const ua = navigator.userAgent || '';
  const hint = (navigator.userAgentData && navigator.userAgentData.platform) || navigator.platform || '';
  const text = `${hint} ${ua}`;
  let os = 'linux';
  if (/Win/i.test(text)) os = 'windows';
  else if (/Mac|iPhone|iPad/i.test(text)) os = 'darwin';
  else if (/FreeBSD/i.test(text)) os = 'freebsd';
  else if (/OpenBSD/i.test(text)) os = 'openbsd';
  let arch = 'amd64';
  if (/aarch64|arm64/i.test(text) || (os === 'darwin' && !/Intel/i.test(text))) arch = 'arm64';
  else if (/armv7|armv6|arm/i.test(text)) arch = 'arm';
  else if (/i[3-6]86|x86(?!_64)/i.test(text) && !/x86_64|Win64|WOW64/i.test(text)) arch = '386';
  return { os, arch };
}

function fillPlatforms(platforms, wanted) {
  const oses = [...new Set(platforms.map((p) => p.os))].sort();
  $('os').replaceChildren(...oses.map((o) => el('option', { value: o, text: o })));
  $('os').value = oses.includes(wanted.os) ? wanted.os : 'linux';
  fillArches(platforms, wanted.arch);
}

function fillArches(platforms, wantedArch) {
  const os = $('os').value;
  const arches = platforms.filter((p) => p.os === os).map((p) => p.arch).sort();
  $('arch').replaceChildren(...arches.map((a) => el('option', { value: a, text: a })));
  $('arch').value = arches.includes(wantedArch) ? wantedArch : (arches.includes('amd64') ? 'amd64' : arches[0]);
  $('arm-row').hidden = $('arch').value !== 'arm';
  $('darwin-warning').hidden = os !== 'darwin';
}

/** The query of the current choice: the api's build parameters. */
function buildQuery() {
  const q = new URLSearchParams();
  q.set('os', $('os').value);
  q.set('arch', $('arch').value);
  if ($('arch').value === 'arm') q.set('arm', $('arm').value);
  q.set('version', $('caddy-version').value || 'latest');
  for (const [module, version] of [...state.selected].sort()) {
    q.append('p', version ? `${module}@${version}` : module);
  }
  for (const line of $('replacements').value.split('\n')) {
    if (line.trim()) q.append('r', line.trim());
  }
  return q;
}

/** Keeps the choice in the page's URL (?package=...&os=...), for sharing and reloads. */
function saveToUrl() {
  const q = new URLSearchParams();
  for (const [module, version] of [...state.selected].sort()) {
    q.append('package', version ? `${module}@${version}` : module);
  }
  q.set('os', $('os').value);
  q.set('arch', $('arch').value);
  if ($('arch').value === 'arm') q.set('arm', $('arm').value);
  if ($('caddy-version').value !== 'latest') q.set('version', $('caddy-version').value);
  history.replaceState(null, '', `${location.pathname}?${q}`);
}

function updateCount() {
  const n = state.selected.size;
  $('selected-count').textContent = `${n} plugin${n === 1 ? '' : 's'} selected`;
}

function renderPlugins() {
  const filter = $('filter').value.trim().toLowerCase();
  const shown = state.packages.filter((p) => {
    if (!filter) return true;
    const text = [p.path, p.description || '', ...(p.modules || []).map((m) => m.name)].join(' ').toLowerCase();
    return text.includes(filter);
  });
  const items = shown.map((p, i) => {
    const id = `plugin-${state.packages.indexOf(p)}`;
    const checked = state.selected.has(p.path);
    const box = el('input', { type: 'checkbox', id, 'data-module': p.path, checked });
    const version = el('input', {
      type: 'text', class: 'version', placeholder: 'latest', 'aria-label': `Version of ${p.path}`,
      value: state.selected.get(p.path) || '', spellcheck: 'false', autocomplete: 'off',
    });
    box.addEventListener('change', () => {
      if (box.checked) state.selected.set(p.path, version.value.trim());
      else state.selected.delete(p.path);
      li.classList.toggle('selected', box.checked);
      changed();
    });
    version.addEventListener('input', () => {
      if (version.value.trim() && !box.checked) { box.checked = true; li.classList.add('selected'); }
      if (box.checked) state.selected.set(p.path, version.value.trim());
      changed();
    });
    const modules = (p.modules || []).map((m) => m.name).join(', ');
    const label = el('label', { for: id },
      el('span', { class: 'path', text: p.path }),
      el('br'),
      el('span', { class: 'small', text: p.description || '' }),
      el('br'),
      el('span', { class: 'muted small', text: `${p.downloads} build${p.downloads === 1 ? '' : 's'}${modules ? ' · ' + modules : ''}` }));
    const li = el('li', { class: checked ? 'selected' : '' }, box, label, version);
    return li;
  });
  $('plugins').replaceChildren(...items);
  $('plugin-summary').textContent = filter
    ? `${shown.length} of ${state.packages.length} plugins match “${$('filter').value.trim()}”`
    : `${state.packages.length} plugins, most built first`;
}

let resolveTimer = null;
function changed() {
  updateCount();
  saveToUrl();
  $('form-error').textContent = '';
  $('resolved').replaceChildren();
  clearTimeout(resolveTimer);
}

function showResolved(r) {
  const rows = [
    ['Caddy', r.request.caddy_version],
    ['Platform', platformName(r.request)],
    ...r.request.plugins.map((p) => [p.module, p.version]),
    ...r.request.replacements.map((x) => [`${x.old} →`, `${x.new}@${x.version}`]),
    ['Build key', r.key],
  ];
  const dl = el('dl', { class: 'resolved' });
  for (const [k, v] of rows) dl.append(el('dt', { text: k }), el('dd', {}, el('code', { text: v })));
  const parts = [el('h2', { text: 'This build' }), dl];
  if (r.build && r.build.status === 'complete') {
    parts.push(el('p', { class: 'ok', text: 'Already built: it downloads at once.' }),
      el('a', { class: 'button', id: 'download-now', href: r.build.links.download, download: '' }, 'Download now'));
  } else if (r.build) {
    parts.push(el('p', {}, 'This build exists: ', el('a', { href: `/build/${r.key}` }, `${r.build.status}`), '.'));
  } else {
    parts.push(el('p', { class: 'muted', text: 'Not built yet: Download starts the build.' }));
  }
  $('resolved').replaceChildren(...parts);
}

async function check() {
  $('form-error').textContent = '';
  $('check').disabled = true;
  try {
    showResolved(await api(`/api/resolve?${buildQuery()}`));
  } catch (e) {
    $('form-error').textContent = e.message;
  } finally {
    $('check').disabled = false;
  }
}

async function download() {
  $('form-error').textContent = '';
  $('download').disabled = true;
  try {
    const build = await api(`/api/build?${buildQuery()}`, { method: 'POST' });
    if (build.status === 'complete') {
      location.assign(build.links.download);
      showResolved({ key: build.key, request: build.request, build });
    } else {
      location.assign(`/build/${build.key}`);
    }
  } catch (e) {
    $('form-error').textContent = e.message;
  } finally {
    $('download').disabled = false;
  }
}

async function main() {
  const params = new URLSearchParams(location.search);
  for (const p of params.getAll('package')) {
    const at = p.lastIndexOf('@');
    if (at > 0) state.selected.set(p.slice(0, at), p.slice(at + 1));
    else state.selected.set(p, '');
  }
  const detected = detectPlatform();
  const wanted = { os: params.get('os') || detected.os, arch: params.get('arch') || detected.arch };
  try {
    const [options, packages] = await Promise.all([api('/api/options'), api('/api/packages')]);
    state.options = options;
    fillPlatforms(options.platforms, wanted);
    if (params.get('arm')) $('arm').value = params.get('arm');
    const versions = options.caddy_versions || [];
    $('caddy-version').append(...versions.map((v) => el('option', { value: v, text: v })));
    const v = params.get('version');
    if (v && versions.includes(v)) $('caddy-version').value = v;
    if (options.replacements_allowed) {
      $('advanced').hidden = false;
      $('replaceable').textContent = options.replaceable.length
        ? `This server lets anyone replace: ${options.replaceable.join(', ')}.`
        : '';
    }
    state.packages = packages.sort((a, b) => b.downloads - a.downloads || a.path.localeCompare(b.path));
    // A deep link may name a plugin the catalog lacks: it stays selected, listed first.
    for (const m of state.selected.keys()) {
      if (!state.packages.some((p) => p.path === m)) {
        state.packages.unshift({ path: m, description: 'Not in this server\u2019s catalog', downloads: 0, modules: [] });
      }
    }
    renderPlugins();
    updateCount();
  } catch (e) {
    $('plugin-summary').textContent = '';
    $('form-error').textContent = `Cannot load the plugin list: ${e.message}`;
  }
  $('filter').addEventListener('input', renderPlugins);
  $('os').addEventListener('change', () => { fillArches(state.options.platforms, $('arch').value); changed(); });
  $('arch').addEventListener('change', () => { $('arm-row').hidden = $('arch').value !== 'arm'; changed(); });
  for (const id of ['arm', 'caddy-version', 'replacements']) $(id).addEventListener('change', changed);
  $('check').addEventListener('click', check);
  $('download').addEventListener('click', download);
}

main();
