// Recent builds, live: the global event feed (/api/events) read from its end and followed.
import { api, el, platformName, STATUS_LABELS } from './common.js';

const $ = (id) => document.getElementById(id);
const rows = new Map(); // key -> { tr, request, status }
const STATUS_OF = {
  requested: 'queued', requeued: 'queued', claimed: 'running', succeeded: 'complete',
  failed: 'failed', gave_up: 'gave_up', cancelled: 'cancelled', artifact_deleted: 'expired',
};

function show(e) {
  let row = rows.get(e.key);
  if (!row) {
    const tr = el('tr', { 'data-key': e.key });
    row = { tr, request: null, status: '' };
    rows.set(e.key, row);
  }
  if (e.type === 'requested' && e.data && e.data.request) row.request = e.data.request;
  const status = STATUS_OF[e.type];
  // A failed attempt that will be retried is followed by `requeued`; the last word wins.
  if (status) row.status = status;
  row.time = e.time;
  render(e.key, row);
  if (!row.request && !row.asked) {
    // Its `requested` event is older than what was read: the status has the request.
    row.asked = true;
    api(`/api/build/${e.key}`).then((b) => { row.request = b.request; render(e.key, row); }, () => {});
  }
  $('builds').prepend(row.tr);
  while ($('builds').children.length > 100) {
    const last = $('builds').lastElementChild;
    rows.delete(last.dataset.key);
    last.remove();
  }
}

function render(key, row) {
  const r = row.request;
  row.tr.replaceChildren(
    el('td', {}, el('a', { href: `/build/${key}`, class: 'mono', text: key.slice(0, 12) })),
    el('td', { text: r ? `${platformName(r)}, Caddy ${r.caddy_version}` : '' }),
    el('td', { text: r ? (r.plugins.map((p) => p.module).join(', ') || '(none)') : '' }),
    el('td', { text: STATUS_LABELS[row.status] || row.status }),
    el('td', {}, el('time', { datetime: row.time, text: new Date(row.time).toLocaleTimeString() })));
}

async function main() {
  let after = null;
  try {
    // The newest events first (oldest of them first), then the feed from there on.
    const page = await api('/api/events?last=300');
    for (const e of page.events) if (e.type !== 'output' && e.type !== 'lease_renewed') show(e);
    after = page.next;
  } catch (e) {
    $('live').textContent = `Cannot read the feed: ${e.message}`;
    return;
  }
  // The feed has no long-poll: read what is new every two seconds.
  for (;;) {
    await new Promise((r) => setTimeout(r, 2000));
    try {
      const page = await api(`/api/events?after=${encodeURIComponent(after)}&limit=500`);
      for (const e of page.events) if (e.type !== 'output' && e.type !== 'lease_renewed') show(e);
      if (page.next) after = page.next;
      $('live').textContent = `Following the event feed (updated ${new Date().toLocaleTimeString()})`;
    } catch (e) {
      $('live').textContent = `The feed cannot be read (${e.message}); trying again`;
    }
  }
}

main();
