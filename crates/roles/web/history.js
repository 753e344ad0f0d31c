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
    return;
  }
  await output(key);
}

// The build's output (its own table, not the history): every chunk, a page at a time.
async function output(key) {
  const lines = [];
  let after = '';
  let pruned = 0;
  let attempt = 0;
  try {
    for (let page = 0; page < 100; page++) {
      const o = await api(`/api/build/${key}/output${after ? `?after=${after}` : ''}`);
      pruned = o.pruned_attempts;
      for (const c of o.chunks) {
        if (c.attempt !== attempt) {
          attempt = c.attempt;
          lines.push(`--- attempt ${attempt} ---`);
        }
        lines.push(...c.lines);
      }
      if (!o.next) break;
      after = o.next;
    }
  } catch (e) {
    $('output-note').textContent = `The output cannot be read: ${e.message}`;
    return;
  }
  const notes = [];
  if (pruned > 0) {
    notes.push(`The output of attempt${pruned > 1 ? 's 1 to' : ''} ${pruned} was removed (retention; see the output_pruned event above).`);
  }
  if (lines.length === 0 && pruned === 0) notes.push('No output was recorded.');
  $('output-note').textContent = notes.join(' ');
  $('output').textContent = lines.join('\n');
}

main();
