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
  const r = row.request;
  row.tr.replaceChildren(
    el('td', {}, el('a', { href: `/build/${e.key}`, class: 'mono', text: e.key.slice(0, 12) })),
    el('td', { text: r ? `${platformName(r)}, Caddy ${r.caddy_version}` : '' }),
    el('td', { text: r ? (r.plugins.map((p) => p.module).join(', ') || '(none)') : '' }),
    el('td', { text: STATUS_LABELS[row.status] || row.status }),
    el('td', {}, el('time', { datetime: e.time, text: new Date(e.time).toLocaleTimeString() })));
  $('builds').prepend(row.tr);
  while ($('builds').children.length > 100) {
    const last = $('builds').lastElementChild;
    rows.delete(last.dataset.key);
    last.remove();
  }
}

async function main() {
  let after = null;
  try {
    // The last page of the feed first: `before` the end, newest last.
    const page = await api('/api/events?limit=200&order=desc');
    for (const e of [...page.events].reverse()) if (e.type !== 'output' && e.type !== 'lease_renewed') show(e);
    after = page.events.length ? page.events[0].cursor : '0-0';
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
