// The bridge's one Durable Object (SQLite storage): the task table (every task the
// bridge saw, queued ones for pull-mode peers included), leases, the nonce memory for
// replay protection and the per-peer token buckets for rate limiting.
//
// Task inputs and large outputs are stored in 1 MiB chunks (SQLite values are capped at
// 2 MB in Durable Objects).

import { DurableObject } from "cloudflare:workers";

const CHUNK = 1 << 20;
const NONCE_TTL_S = 600;
export const MAX_LEASES = 5;

const SCHEMA = `
CREATE TABLE IF NOT EXISTS tasks (
  id TEXT PRIMARY KEY,
  seq INTEGER NOT NULL,
  kind TEXT NOT NULL,
  version TEXT NOT NULL,
  params TEXT NOT NULL,
  priority INTEGER NOT NULL DEFAULT 0,
  state TEXT NOT NULL,
  executed_by TEXT,
  output TEXT,
  output_chunks INTEGER NOT NULL DEFAULT 0,
  error TEXT,
  waiting_reason TEXT,
  attempts TEXT NOT NULL DEFAULT '[]',
  submitter TEXT,
  tag TEXT,
  cached INTEGER NOT NULL DEFAULT 0,
  cache_key TEXT,
  input_size INTEGER NOT NULL DEFAULT 0,
  input_cid TEXT,
  signature TEXT,
  leases INTEGER NOT NULL DEFAULT 0,
  lease_peer TEXT,
  lease_until REAL,
  submitted REAL NOT NULL,
  started REAL,
  finished REAL
);
CREATE INDEX IF NOT EXISTS tasks_queue ON tasks(state, priority DESC, seq);
CREATE INDEX IF NOT EXISTS tasks_lease ON tasks(state, lease_until);
CREATE TABLE IF NOT EXISTS blobs (
  task_id TEXT NOT NULL,
  part TEXT NOT NULL,
  n INTEGER NOT NULL,
  data BLOB NOT NULL,
  PRIMARY KEY (task_id, part, n)
);
CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, seen REAL NOT NULL);
CREATE INDEX IF NOT EXISTS nonces_seen ON nonces(seen);
CREATE TABLE IF NOT EXISTS buckets (peer TEXT PRIMARY KEY, tokens REAL NOT NULL, at REAL NOT NULL);
`;

const COLUMNS =
  "id, kind, version, params, priority, state, executed_by, output, output_chunks, error," +
  " waiting_reason, attempts, submitter, tag, cached, input_size, input_cid, signature," +
  " leases, lease_peer, lease_until, submitted, started, finished";

export class TaskQueue extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    ctx.blockConcurrencyWhile(async () => {
      for (const stmt of SCHEMA.split(";").map((s) => s.trim()).filter(Boolean)) this.sql.exec(stmt);
    });
  }

  now() {
    return Date.now() / 1000;
  }

  // --- admission: replay protection and rate limiting ----------------------------------
  admit(peer, nonce, rate, burst) {
    const now = this.now();
    const row = this.sql.exec("SELECT tokens, at FROM buckets WHERE peer = ?", peer).toArray()[0];
    let tokens = row ? Math.min(burst, row.tokens + (now - row.at) * rate) : burst;
    if (tokens < 1) {
      this.sql.exec("INSERT OR REPLACE INTO buckets(peer, tokens, at) VALUES (?, ?, ?)", peer, tokens, now);
      return { ok: false, code: "rate_limited", retryAfter: Math.max(1, Math.ceil((1 - tokens) / rate)) };
    }
    tokens -= 1;
    this.sql.exec("INSERT OR REPLACE INTO buckets(peer, tokens, at) VALUES (?, ?, ?)", peer, tokens, now);
    // bounded clean-up of old nonces on every admission
    this.sql.exec(
      "DELETE FROM nonces WHERE nonce IN (SELECT nonce FROM nonces WHERE seen < ? ORDER BY seen LIMIT 200)",
      now - NONCE_TTL_S,
    );
    const seen = this.sql.exec("SELECT seen FROM nonces WHERE nonce = ?", nonce).toArray();
    if (seen.length) return { ok: false, code: "replayed_nonce" };
    this.sql.exec("INSERT INTO nonces(nonce, seen) VALUES (?, ?)", nonce, now);
    return { ok: true };
  }

  // --- blobs ---------------------------------------------------------------------------
  putBlob(id, part, bytes) {
    this.sql.exec("DELETE FROM blobs WHERE task_id = ? AND part = ?", id, part);
    let n = 0;
    for (let off = 0; off < bytes.length || (off === 0 && n === 0); off += CHUNK) {
      this.sql.exec(
        "INSERT INTO blobs(task_id, part, n, data) VALUES (?, ?, ?, ?)",
        id,
        part,
        n++,
        bytes.subarray(off, off + CHUNK),
      );
      if (bytes.length === 0) break;
    }
    return n;
  }

  getBlob(id, part) {
    const rows = this.sql.exec("SELECT data FROM blobs WHERE task_id = ? AND part = ? ORDER BY n", id, part).toArray();
    const parts = rows.map((r) => new Uint8Array(r.data));
    const total = parts.reduce((a, p) => a + p.length, 0);
    const out = new Uint8Array(total);
    let off = 0;
    for (const p of parts) {
      out.set(p, off);
      off += p.length;
    }
    return out;
  }

  setOutput(id, outputText) {
    if (outputText === null || outputText === undefined) return [null, 0];
    if (outputText.length <= CHUNK) return [outputText, 0];
    const n = this.putBlob(id, "out", new TextEncoder().encode(outputText));
    return [null, n];
  }

  // --- tasks ---------------------------------------------------------------------------
  row(id) {
    return this.sql.exec(`SELECT ${COLUMNS} FROM tasks WHERE id = ?`, id).toArray()[0] || null;
  }

  view(row) {
    if (!row) return null;
    let output = row.output;
    if (row.output_chunks > 0) output = new TextDecoder().decode(this.getBlob(row.id, "out"));
    return { ...row, output, output_chunks: undefined };
  }

  // task: {id, kind, version, params (JSON text), priority, state, executed_by, output
  // (JSON text or null), error, waiting_reason, submitter, tag (JSON text), cached,
  // input_cid, submitted, started, finished}; input: Uint8Array stored for queued tasks
  put(task, input) {
    this.expireLeases();
    const existing = this.row(task.id);
    if (existing) return { existing: true, task: this.view(existing) };
    const seq = (this.sql.exec("SELECT COALESCE(MAX(seq), 0) + 1 AS s FROM tasks").toArray()[0] || { s: 1 }).s;
    const [outText, chunks] = this.setOutput(task.id, task.output);
    this.sql.exec(
      "INSERT INTO tasks(id, seq, kind, version, params, priority, state, executed_by, output, output_chunks," +
        " error, waiting_reason, attempts, submitter, tag, cached, cache_key, input_size, input_cid, submitted," +
        " started, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
      task.id,
      seq,
      task.kind,
      task.version,
      task.params,
      task.priority,
      task.state,
      task.executed_by ?? null,
      outText,
      chunks,
      task.error ?? null,
      task.waiting_reason ?? null,
      task.attempts ?? "[]",
      task.submitter ?? null,
      task.tag ?? null,
      task.cached ? 1 : 0,
      task.cache_key ?? null,
      input ? input.length : 0,
      task.input_cid ?? null,
      task.submitted,
      task.started ?? null,
      task.finished ?? null,
    );
    if (input && task.state === "queued") this.putBlob(task.id, "in", input);
    return { existing: false, task: this.view(this.row(task.id)) };
  }

  get(id) {
    this.expireLeases();
    return this.view(this.row(id));
  }

  list(state, kind, limit) {
    this.expireLeases();
    const where = [];
    const args = [];
    if (state) {
      where.push("state = ?");
      args.push(state);
    }
    if (kind) {
      where.push("kind = ?");
      args.push(kind);
    }
    const order = state === "queued" ? "priority DESC, seq" : "seq DESC";
    const sql =
      `SELECT ${COLUMNS} FROM tasks ${where.length ? "WHERE " + where.join(" AND ") : ""}` +
      ` ORDER BY ${order} LIMIT ?`;
    const rows = this.sql.exec(sql, ...args, limit).toArray();
    return rows.map((r) => this.view(r));
  }

  counts() {
    const rows = this.sql.exec("SELECT state, COUNT(*) AS n FROM tasks GROUP BY state").toArray();
    return Object.fromEntries(rows.map((r) => [r.state, r.n]));
  }

  // kinds: {name: version|null}; returns leased tasks with their inputs
  async lease(peer, kinds, max, leaseS) {
    this.expireLeases();
    const names = Object.keys(kinds);
    if (!names.length) return [];
    const now = this.now();
    const marks = names.map(() => "?").join(", ");
    const rows = this.sql
      .exec(
        `SELECT ${COLUMNS} FROM tasks WHERE state = 'queued' AND kind IN (${marks})` +
          " ORDER BY priority DESC, seq LIMIT ?",
        ...names,
        max * 4 + 16,
      )
      .toArray()
      .filter((r) => kinds[r.kind] === null || kinds[r.kind] === undefined || kinds[r.kind] === r.version)
      .slice(0, max);
    const out = [];
    for (const r of rows) {
      const attempts = JSON.parse(r.attempts);
      attempts.push({ peer, started: now, ended: null, error: null });
      const until = now + leaseS;
      this.sql.exec(
        "UPDATE tasks SET state = 'running', lease_peer = ?, lease_until = ?, leases = leases + 1," +
          " attempts = ?, started = COALESCE(started, ?), waiting_reason = NULL WHERE id = ?",
        peer,
        until,
        JSON.stringify(attempts),
        now,
        r.id,
      );
      out.push({ task: this.view(this.row(r.id)), input: this.getBlob(r.id, "in"), leaseUntil: until });
    }
    await this.scheduleAlarm();
    return out;
  }

  // result: {ok, outputText, error, executor, signature}
  complete(id, peer, result) {
    this.expireLeases();
    const r = this.row(id);
    if (!r) return { status: "missing" };
    if (r.state === "done" || r.state === "failed" || r.state === "cancelled") {
      return { status: "finished", task: this.view(r) };
    }
    const now = this.now();
    const attempts = JSON.parse(r.attempts);
    const mine = [...attempts].reverse().find((a) => a.peer === peer && a.ended === null);
    if (mine) {
      mine.ended = now;
      mine.error = result.ok ? null : result.error;
    } else {
      attempts.push({ peer, started: now, ended: now, error: result.ok ? null : result.error });
    }
    const [outText, chunks] = this.setOutput(id, result.ok ? result.outputText : null);
    this.sql.exec(
      "UPDATE tasks SET state = ?, executed_by = ?, output = ?, output_chunks = ?, error = ?, attempts = ?," +
        " signature = ?, lease_peer = NULL, lease_until = NULL, finished = ?, started = COALESCE(started, ?)" +
        " WHERE id = ?",
      result.ok ? "done" : "failed",
      result.executor || peer,
      outText,
      chunks,
      result.ok ? null : result.error,
      JSON.stringify(attempts),
      result.signature ?? null,
      now,
      now,
      id,
    );
    this.sql.exec("DELETE FROM blobs WHERE task_id = ? AND part = 'in'", id);
    const task = this.view(this.row(id));
    return { status: "ok", task, cacheKey: r.cache_key ?? null };
  }

  cacheKeyOf(id) {
    const rows = this.sql.exec("SELECT cache_key FROM tasks WHERE id = ?", id).toArray();
    return rows.length ? rows[0].cache_key : null;
  }

  // Leases that ran out go back to the queue (or fail after MAX_LEASES).
  expireLeases() {
    const now = this.now();
    const rows = this.sql
      .exec("SELECT id, attempts, leases, lease_peer FROM tasks WHERE state = 'running' AND lease_until < ? LIMIT 500", now)
      .toArray();
    for (const r of rows) {
      const attempts = JSON.parse(r.attempts);
      const open = [...attempts].reverse().find((a) => a.ended === null);
      if (open) {
        open.ended = now;
        open.error = "lease expired";
      }
      if (r.leases >= MAX_LEASES) {
        this.sql.exec(
          "UPDATE tasks SET state = 'failed', error = ?, attempts = ?, lease_peer = NULL, lease_until = NULL," +
            " finished = ? WHERE id = ?",
          `gave up after ${r.leases} expired leases; last holder ${r.lease_peer}`,
          JSON.stringify(attempts),
          now,
          r.id,
        );
        this.sql.exec("DELETE FROM blobs WHERE task_id = ? AND part = 'in'", r.id);
      } else {
        this.sql.exec(
          "UPDATE tasks SET state = 'queued', attempts = ?, lease_peer = NULL, lease_until = NULL," +
            " waiting_reason = ? WHERE id = ?",
          JSON.stringify(attempts),
          `lease held by ${r.lease_peer} expired; waiting for a pull-mode peer`,
          r.id,
        );
      }
    }
    return rows.length;
  }

  async scheduleAlarm() {
    const next = this.sql
      .exec("SELECT MIN(lease_until) AS t FROM tasks WHERE state = 'running' AND lease_until IS NOT NULL")
      .toArray()[0];
    if (next && next.t !== null) {
      const current = await this.ctx.storage.getAlarm();
      const want = Math.ceil(next.t * 1000) + 50;
      if (current === null || current > want) await this.ctx.storage.setAlarm(want);
    }
  }

  async alarm() {
    this.expireLeases();
    await this.scheduleAlarm();
  }
}
