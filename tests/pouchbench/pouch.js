// The PouchDB side of `bench side-by-side` (issue 17): the same records and phases as
// tidesync's `bench sync`, in the same run, with PouchDB 9 (leveldb) on 127.0.0.1.
//
//   node pouch.js --objects N --dir DIR   prints one JSON line of figures
//
// Two processes, as with tidesync: A serves its database over the CouchDB replication protocol
// (express-pouchdb), and B replicates from A's URL. The driver times each phase, counts the bytes
// A's HTTP server read and wrote, and reads each process's peak memory (VmHWM) from /proc.
// PouchDB's leveldb does not fsync its writes; tidesync's are durable.
'use strict';

const { fork } = require('child_process');
const fs = require('fs');
const path = require('path');

const BULK = 1000; // documents per bulkDocs, as in the PouchDB figure
const CONNECTED_EDITS = 500; // the "1 % delta while connected" phase

function fields(i, round) {
  return {
    status: round === 0 ? 'received' : 'analysed',
    volume_ml: 1.0 + (i % 100) / 10.0,
    site: `site-${i % 17}`,
    operator: `op-${i % 29}`,
    batch: Math.floor(i / 100),
    priority: i % 5,
    container: 'vial-2ml',
    received_at: 1700000000 + i,
    tags: ['bench', `t${i % 7}`],
    round,
  };
}

const docId = (k) => `Sample/S-${String(k).padStart(6, '0')}`;

function peakMib(pid) {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const line = status.split('\n').find((l) => l.startsWith('VmHWM:'));
  return line ? Math.round(parseInt(line.split(/\s+/)[1], 10) / 1024) : 0;
}

// --- the two node processes ------------------------------------------------------------------

function serve(dir) {
  const PouchDB = require('pouchdb');
  const express = require('express');
  const Prefixed = PouchDB.defaults({ prefix: dir + path.sep });
  const db = new Prefixed('lab');
  const app = express();
  app.use('/', require('express-pouchdb')(Prefixed, { mode: 'minimumForPouchDB', logPath: path.join(dir, 'log.txt') }));
  let closedBytes = 0;
  const sockets = new Set();
  const server = app.listen(0, '127.0.0.1', () => {
    process.send({ ready: true, url: `http://127.0.0.1:${server.address().port}/lab` });
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => {
      closedBytes += s.bytesRead + s.bytesWritten;
      sockets.delete(s);
    });
  });
  const wireBytes = () => {
    let n = closedBytes;
    for (const s of sockets) n += s.bytesRead + s.bytesWritten;
    return n;
  };
  process.on('message', async (m) => {
    try {
      if (m.op === 'seed') {
        for (let i = m.from; i < m.to; i += BULK) {
          const end = Math.min(i + BULK, m.to);
          const ids = [];
          for (let k = i; k < end; k++) ids.push(docId(k));
          const revs = new Map();
          if (m.round > 0) {
            const have = await db.allDocs({ keys: ids });
            for (const row of have.rows) if (row.value) revs.set(row.id, row.value.rev);
          }
          const docs = ids.map((id, j) => {
            const d = { _id: id, ...fields(i + j, m.round) };
            if (revs.has(id)) d._rev = revs.get(id);
            return d;
          });
          const res = await db.bulkDocs(docs);
          const bad = res.find((r) => r.error);
          if (bad) throw new Error(`bulkDocs: ${JSON.stringify(bad)}`);
        }
        process.send({ done: true });
      } else if (m.op === 'edit') {
        // One edit at a time, as an application writes: read, change, put.
        for (let k = m.from; k < m.to; k++) {
          const doc = await db.get(docId(k));
          Object.assign(doc, fields(k, m.round));
          await db.put(doc);
        }
        process.send({ done: true });
      } else if (m.op === 'bytes') {
        process.send({ bytes: wireBytes() });
      }
    } catch (e) {
      process.send({ error: String(e && e.stack || e) });
    }
  });
}

function replica(dir) {
  const PouchDB = require('pouchdb');
  const db = new (PouchDB.defaults({ prefix: dir + path.sep }))('lab');
  let live = null;
  process.on('message', async (m) => {
    try {
      if (m.op === 'replicate') {
        const r = await PouchDB.replicate(m.url, db, { batch_size: 1000, batches_limit: 10 });
        process.send({ done: true, docs_written: r.docs_written });
      } else if (m.op === 'live') {
        live = PouchDB.replicate(m.url, db, { live: true, retry: true, batch_size: 1000 });
        live.on('paused', () => process.send({ paused: true }));
      } else if (m.op === 'wait-doc') {
        // Until B holds document `k` at `round`; the changes feed wakes this up.
        const want = docId(m.k);
        const check = async () => {
          try {
            return (await db.get(want)).round === m.round;
          } catch (_) {
            return false;
          }
        };
        if (await check()) return process.send({ done: true });
        const feed = db.changes({ live: true, since: 'now' });
        let answered = false;
        const maybe = async () => {
          if (!answered && (await check())) {
            answered = true;
            feed.cancel();
            process.send({ done: true });
          }
        };
        feed.on('change', maybe);
        maybe(); // a change between the first check and the feed's start

      } else if (m.op === 'stop-live') {
        if (live) live.cancel();
        live = null;
        process.send({ done: true });
      }
    } catch (e) {
      process.send({ error: String(e && e.stack || e) });
    }
  });
  process.send({ ready: true });
}

// --- the driver ------------------------------------------------------------------------------

function start(role, dir) {
  const child = fork(__filename, [role, dir], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  const waiters = [];
  const arrived = []; // answers nobody waits for yet
  child.on('message', (m) => {
    if (m.error) {
      console.error(`${role}: ${m.error}`);
      process.exit(1);
    }
    if (m.paused) return;
    const w = waiters.shift();
    if (w) w(m);
    else arrived.push(m);
  });
  const next = () =>
    new Promise((resolve) => (arrived.length ? resolve(arrived.shift()) : waiters.push(resolve)));
  return { child, next, ask: (m) => { const p = next(); child.send(m); return p; } };
}

async function drive(objects, dir) {
  fs.mkdirSync(path.join(dir, 'a'), { recursive: true });
  fs.mkdirSync(path.join(dir, 'b'), { recursive: true });
  const a = start('serve', path.join(dir, 'a'));
  const b = start('replica', path.join(dir, 'b'));
  const { url } = await a.next();
  await b.next();
  const out = { objects };
  const secs = (t) => Number(process.hrtime.bigint() - t) / 1e9;
  const bytes = async () => (await a.ask({ op: 'bytes' })).bytes;

  let t = process.hrtime.bigint();
  await a.ask({ op: 'seed', from: 0, to: objects, round: 0 });
  out.bulk_create_s = secs(t);

  let before = await bytes();
  t = process.hrtime.bigint();
  const first = await b.ask({ op: 'replicate', url });
  out.initial_sync_s = secs(t);
  out.initial_sync_bytes = (await bytes()) - before;
  if (first.docs_written !== objects) throw new Error(`B received ${first.docs_written} of ${objects}`);

  before = await bytes();
  t = process.hrtime.bigint();
  await b.ask({ op: 'replicate', url });
  out.idle_resync_ms = secs(t) * 1e3;
  out.idle_resync_bytes = (await bytes()) - before;

  const changed = Math.max(1, Math.floor(objects / 100));
  await a.ask({ op: 'seed', from: 0, to: changed, round: 1 });
  before = await bytes();
  t = process.hrtime.bigint();
  await b.ask({ op: 'replicate', url });
  out.delta_reconnect_s = secs(t);
  out.delta_reconnect_bytes = (await bytes()) - before;

  // Connected: B replicates live; A makes 500 edits one at a time; the clock stops when B
  // holds the last of them.
  b.child.send({ op: 'live', url });
  await new Promise((r) => setTimeout(r, 1000));
  const edits = Math.min(CONNECTED_EDITS, objects);
  const waiting = b.ask({ op: 'wait-doc', k: edits - 1, round: 2 });
  t = process.hrtime.bigint();
  await a.ask({ op: 'edit', from: 0, to: edits, round: 2 });
  await waiting;
  out.delta_connected_s = secs(t);
  await b.ask({ op: 'stop-live' });

  out.peak_a_mib = peakMib(a.child.pid);
  out.peak_b_mib = peakMib(b.child.pid);
  a.child.kill();
  b.child.kill();
  console.log(JSON.stringify(out));
}

const [, , role, arg] = process.argv;
if (role === 'serve') serve(arg);
else if (role === 'replica') replica(arg);
else {
  const get = (name, dflt) => {
    const i = process.argv.indexOf(name);
    return i > 0 ? process.argv[i + 1] : dflt;
  };
  drive(parseInt(get('--objects', '50000'), 10), get('--dir', fs.mkdtempSync('/tmp/pouchbench-')))
    .catch((e) => {
      console.error(e);
      process.exit(1);
    });
}
