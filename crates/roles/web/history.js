// A build's history: every event of the log with its time (the audit trail).
import { api, el, keyFromPath } from './common.js';

const $ = (id) => document.getElementById(id);

function details(e) {
  const d = { ...e.data };
  if (e.type === 'output' && Array.isArray(d.lines)) {
    return d.lines.join('\n');
  }
  return JSON.stringify(d);
}

async function main() {
  const key = keyFromPath();
  if (!key) {
    $('error').textContent = 'The address should be /build/<key>/history.';
    return;
  }
  $('build-link').href = `/build/${key}`;
  try {
    const h = await api(`/api/build/${key}/history`);
    $('events').replaceChildren(...h.events.map((e) => el('tr', { 'data-type': e.type },
      el('td', { text: String(e.seq) }),
      el('td', {}, el('time', { datetime: e.time, text: new Date(e.time).toLocaleString() })),
      el('td', { text: e.type }),
      el('td', { class: 'data', text: details(e) }))));
  } catch (e) {
    $('error').textContent = e.status === 404 ? 'No build has this key.' : e.message;
  }
}

main();
