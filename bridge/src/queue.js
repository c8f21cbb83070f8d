// A task shard (Durable Object "shard-<i>", SQLite storage): the tasks whose id hashes to
// it (src/shards.js), queued ones for pull-mode peers included, and their leases, bound
// to the authenticated peer that holds them. There are SHARDS of them (wrangler.jsonc),
// so no single object is on every request's path.
//
// Size discipline: a row holds params (<= 512 KiB), tag (<= 16 KiB), an error (<= 2 KB)
// and inline input and output of at most INLINE_BYTES (src/r2.js) each; larger inputs and
// outputs live in R2 by CID and the row holds the CID and the size. Every answer is
// bounded: one task, or a list/peek/claim bounded in rows and bytes.
//
// The shard tells the control object (src/control.js) when it gets its first queued task
// of a kind or loses its last one; leases ask the control object which shards to look in.

import { DurableObject } from "cloudflare:workers";
import { controlStub } from "./shards.js";

export const MAX_LEASES = 5;
// A list answer from one shard carries at most about this many bytes of params, tags and
// inline outputs (at least one row).
export const LIST_BYTES = 4 * 1024 * 1024;
// Clean-up (by alarm): finished tasks older than RETENTION_S (var, default 7 days), at
// most CLEANUP_BATCH per run, again CLEANUP_SOON_S later while there is more, else every
// CLEANUP_INTERVAL_S.
const DEFAULT_RETENTION_S = 7 * 86400;
const CLEANUP_BATCH = 500;
const CLEANUP_INTERVAL_S = 3600;
const CLEANUP_SOON_S = 1;
const HINT_RETRY_S = 5;
// A portable run is recorded ("running", executed_by "bridge", no lease) before it starts.
// One still running after EDGE_RUN_S (var; default 120 s, four times the default CPU
// limit) died with its isolate (CPU or memory limit): it fails with that reason, unless
// the client retries first (then it is queued for pull-mode peers, see requeueEdge).
const DEFAULT_EDGE_RUN_S = 120;
const EDGE_RUNNING = "state = 'running' AND lease_peer IS NULL AND executed_by = 'bridge'";

const SCHEMA = [
  `CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    version TEXT NOT NULL,
    params TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    executed_by TEXT,
    output TEXT,
    output_cid TEXT,
    output_size INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    waiting_reason TEXT,
    attempts TEXT NOT NULL DEFAULT '[]',
    submitter TEXT,
    tag TEXT,
    cache_key TEXT,
    input BLOB,
    input_key TEXT,
    input_size INTEGER NOT NULL DEFAULT 0,
    input_cid TEXT,
    signature TEXT,
    leases INTEGER NOT NULL DEFAULT 0,
    lease_peer TEXT,
    lease_until REAL,
    submitted REAL NOT NULL,
    started REAL,
    finished REAL
  )`,
  "CREATE INDEX IF NOT EXISTS tasks_queue ON tasks(state, priority DESC, seq)",
  "CREATE INDEX IF NOT EXISTS tasks_kind ON tasks(kind, state, priority DESC, seq)",
  "CREATE INDEX IF NOT EXISTS tasks_lease ON tasks(state, lease_until)",
  "CREATE INDEX IF NOT EXISTS tasks_seq ON tasks(seq)",
  "CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(finished)",
  // the last directory hint of each kind this shard decided, and whether it was delivered
  "CREATE TABLE IF NOT EXISTS hints (kind TEXT PRIMARY KEY, has INTEGER NOT NULL, ver INTEGER NOT NULL, sent INTEGER NOT NULL)",
  "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL)",
];

// Every column but the inline input (leases read that one on its own).
const COLUMNS =
  "id, kind, version, params, priority, state, executed_by, output, output_cid, output_size, error," +
  " waiting_reason, attempts, submitter, tag, input_key, input_size, input_cid, signature," +
  " leases, lease_peer, lease_until, submitted, started, finished";

export class TaskQueue extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    for (const s of SCHEMA) this.sql.exec(s);
    const row = this.sql.exec("SELECT v FROM meta WHERE k = 'shard'").toArray()[0];
    this.index = row ? row.v : null;
    this.alarmAt = null;
  }

  now() {
    return Date.now() / 1000;
  }

  // The shard's number, told by the Worker on every call that can change the queue (the
  // alarm needs it to send hints).
  setIndex(index) {
    if (this.index === index) return;
    this.index = index;
    this.sql.exec("INSERT OR REPLACE INTO meta(k, v) VALUES ('shard', ?)", index);
  }

  // --- the directory hints -------------------------------------------------------------
  // Decide the hint of each kind from the table; send the undelivered ones.
  async syncHints(kinds) {
    for (const kind of new Set(kinds)) {
      const has = this.sql.exec("SELECT 1 FROM tasks WHERE kind = ? AND state = 'queued' LIMIT 1", kind).toArray().length ? 1 : 0;
      const h = this.sql.exec("SELECT has, ver FROM hints WHERE kind = ?", kind).toArray()[0];
      if (h && h.has === has) continue;
      this.sql.exec("INSERT OR REPLACE INTO hints(kind, has, ver, sent) VALUES (?, ?, ?, 0)", kind, has, (h ? h.ver : 0) + 1);
    }
    await this.flushHints();
  }

  async flushHints() {
    if (this.index === null) return;
    const pending = this.sql.exec("SELECT kind, has, ver FROM hints WHERE sent = 0 LIMIT 200").toArray();
    if (!pending.length) return;
    try {
      await controlStub(this.env).setHints(this.index, pending);
      for (const h of pending) this.sql.exec("UPDATE hints SET sent = 1 WHERE kind = ? AND ver = ?", h.kind, h.ver);
    } catch (e) {
      // Not lost: the alarm sends it again.
      console.error("bridge: directory hint not delivered", e && e.message);
      await this.scheduleAlarm(HINT_RETRY_S);
    }
  }

  // --- edge runs -----------------------------------------------------------------------
  // One round trip for a submit with an id: the stored task (if any).
  async prepare(id) {
    await this.expireLeases();
    const existing = this.view(this.row(id));
    const edgeRunning = !!existing && existing.state === "running" && existing.lease_peer === null && existing.executed_by === "bridge";
    return { existing, edgeRunning };
  }

  // A portable run that finished: only a row still in its edge-running state is updated
  // (a retry may have queued it for pull-mode peers meanwhile).
  finishEdge(id, result) {
    this.sql.exec(
      `UPDATE tasks SET state = ?, output = ?, output_cid = ?, output_size = ?, error = ?, attempts = ?, finished = ? WHERE id = ? AND ${EDGE_RUNNING}`,
      result.state,
      result.output ?? null,
      result.output_cid ?? null,
      result.output_size ?? 0,
      result.error,
      result.attempts,
      result.finished,
      id,
    );
    return this.view(this.row(id));
  }

  // The client retried a task whose edge run never finished (its isolate was killed, or
  // the answer was lost): running it at the edge again would likely hit the same limit,
  // so it is queued for pull-mode peers, with the retry's input.
  async requeueEdge(index, id, input, reason) {
    this.setIndex(index);
    const r = this.row(id);
    if (!r || r.state !== "running" || r.lease_peer !== null || r.executed_by !== "bridge") return this.view(r);
    const now = this.now();
    const attempts = JSON.parse(r.attempts);
    for (const a of attempts) if (a.ended === null) Object.assign(a, { ended: now, error: reason });
    this.sql.exec(
      "UPDATE tasks SET state = 'queued', executed_by = NULL, attempts = ?, waiting_reason = ?, input = ?, input_key = ?," +
        " input_size = ? WHERE id = ?",
      JSON.stringify(attempts),
      `${reason}; waiting for a pull-mode peer`,
      input.inline,
      input.key,
      input.size,
      id,
    );
    await this.syncHints([r.kind]);
    return this.view(this.row(id));
  }

  edgeRunS() {
    const v = Number(this.env.EDGE_RUN_S);
    return Number.isFinite(v) && v > 0 ? v : DEFAULT_EDGE_RUN_S;
  }

  // Edge runs that never finished fail with the likely reason (bounded per call).
  expireEdgeRuns() {
    const now = this.now();
    const rows = this.sql
      .exec(`SELECT id, attempts FROM tasks WHERE ${EDGE_RUNNING} AND started < ? LIMIT 100`, now - this.edgeRunS())
      .toArray();
    const error = "the bridge stopped while running it (its isolate hit the CPU or memory limit); submit it with a new id to queue it for pull-mode peers";
    for (const r of rows) {
      const attempts = JSON.parse(r.attempts);
      for (const a of attempts) if (a.ended === null) Object.assign(a, { ended: now, error });
      this.sql.exec("UPDATE tasks SET state = 'failed', error = ?, attempts = ?, finished = ? WHERE id = ?", error, JSON.stringify(attempts), now, r.id);
    }
  }

  // --- tasks ---------------------------------------------------------------------------
  row(id) {
    return this.sql.exec(`SELECT ${COLUMNS} FROM tasks WHERE id = ?`, id).toArray()[0] || null;
  }

  view(row) {
    return row || null;
  }

  // task: {id, kind, version, params (JSON text), priority, state, executed_by, output
  // (inline JSON text) or output_cid + output_size, error, waiting_reason, submitter, tag
  // (JSON text), cache_key, input_cid, submitted, started, finished, attempts};
  // input: {inline: Uint8Array|null, key: raw CID in R2|null, size} for queued tasks.
  async put(index, task, input) {
    this.setIndex(index);
    if (this.alarmAt === null) await this.scheduleAlarm();
    const existing = this.row(task.id);
    if (existing) return { existing: true, task: this.view(existing) };
    // MAX(seq) is answered from the tasks_seq index, not a table scan
    const seq = this.sql.exec("SELECT COALESCE(MAX(seq), 0) + 1 AS s FROM tasks").toArray()[0].s;
    const queued = task.state === "queued";
    this.sql.exec(
      "INSERT INTO tasks(id, seq, kind, version, params, priority, state, executed_by, output, output_cid, output_size," +
        " error, waiting_reason, attempts, submitter, tag, cache_key, input, input_key, input_size, input_cid, submitted," +
        " started, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
      task.id,
      seq,
      task.kind,
      task.version,
      task.params,
      task.priority,
      task.state,
      task.executed_by ?? null,
      task.output ?? null,
      task.output_cid ?? null,
      task.output_size ?? 0,
      task.error ?? null,
      task.waiting_reason ?? null,
      task.attempts ?? "[]",
      task.submitter ?? null,
      task.tag ?? null,
      task.cache_key ?? null,
      queued && input ? input.inline : null,
      queued && input ? input.key : null,
      queued && input ? input.size : 0,
      task.input_cid ?? null,
      task.submitted,
      task.started ?? null,
      task.finished ?? null,
    );
    if (queued) await this.syncHints([task.kind]);
    return { existing: false, task: this.view(this.row(task.id)) };
  }

  async get(id) {
    await this.expireLeases();
    return this.view(this.row(id));
  }

  // At most `limit` rows and about `budget` bytes of params, tags and outputs (outputs in
  // R2 count by size; at least one row). {tasks, more}.
  async list(state, kind, limit, budget = LIST_BYTES) {
    await this.expireLeases();
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
    const sizes =
      "SELECT id, LENGTH(CAST(COALESCE(output, '') AS BLOB)) + output_size + LENGTH(CAST(params AS BLOB))" +
      ` + LENGTH(CAST(COALESCE(tag, '') AS BLOB)) AS bytes FROM tasks ${where.length ? "WHERE " + where.join(" AND ") : ""}` +
      ` ORDER BY ${order} LIMIT ?`;
    const out = [];
    let total = 0;
    let more = false;
    for (const r of this.sql.exec(sizes, ...args, limit + 1).toArray()) {
      if (out.length === limit || (out.length && total + r.bytes > budget)) {
        more = true;
        break;
      }
      total += r.bytes;
      out.push(this.view(this.row(r.id)));
    }
    return { tasks: out, more };
  }

  // The best `max` queued tasks of `kinds` ({name: version|null}) here, for the Worker
  // to merge across shards: [{id, priority, submitted, seq, size}].
  async peek(kinds, max) {
    await this.expireLeases();
    if (!Object.keys(kinds).length) return [];
    return this.sql
      .exec(
        "SELECT t.id, t.priority, t.submitted, t.seq, t.input_size AS size FROM tasks t JOIN json_each(?) j ON t.kind = j.key" +
          " WHERE t.state = 'queued' AND (j.value IS NULL OR j.value = t.version)" +
          " ORDER BY t.priority DESC, t.seq LIMIT ?",
        JSON.stringify(kinds),
        max,
      )
      .toArray();
  }

  // Lease the tasks of `ids` that are still queued to the authenticated `peer`.
  // [{task, input (inline bytes or null), leaseUntil}]; a task with input_key has its
  // input in R2.
  async claim(index, peer, ids, leaseS) {
    this.setIndex(index);
    await this.expireLeases();
    const now = this.now();
    const until = now + leaseS;
    const out = [];
    const kinds = [];
    for (const id of ids) {
      const r = this.row(id);
      if (!r || r.state !== "queued") continue;
      const attempts = JSON.parse(r.attempts);
      attempts.push({ peer, started: now, ended: null, error: null });
      this.sql.exec(
        "UPDATE tasks SET state = 'running', lease_peer = ?, lease_until = ?, leases = leases + 1," +
          " attempts = ?, started = COALESCE(started, ?), waiting_reason = NULL WHERE id = ?",
        peer,
        until,
        JSON.stringify(attempts),
        now,
        id,
      );
      const input = this.sql.exec("SELECT input FROM tasks WHERE id = ?", id).toArray()[0].input;
      out.push({ task: this.view(this.row(id)), input: input === null ? null : new Uint8Array(input), leaseUntil: until });
      kinds.push(r.kind);
    }
    if (out.length) await this.scheduleAlarm();
    await this.syncHints(kinds);
    return out;
  }

  // result: {ok, output (inline JSON text) | output_cid + output_size, error, signature}.
  // Accepted only from `peer`, the authenticated holder of the task's current lease;
  // `executed_by` is that peer.
  // Whether `peer` may post the result of `id` now: {status: "ok"} or the refusal. The
  // Worker asks before it writes a large output to R2, so a refused one is never stored.
  async leaseStatus(id, peer) {
    await this.expireLeases();
    const r = this.row(id);
    if (!r) return { status: "missing" };
    if (r.state === "done" || r.state === "failed" || r.state === "cancelled") {
      return { status: "finished", task: this.view(r) };
    }
    if (r.state !== "running" || r.lease_peer === null) {
      const attempts = JSON.parse(r.attempts);
      const hadLease = attempts.some((a) => a.peer === peer && a.error === "lease expired");
      return { status: hadLease ? "lease_expired" : "not_leased" };
    }
    if (r.lease_peer !== peer) return { status: "not_lease_holder" };
    return { status: "ok", row: r };
  }

  async complete(id, peer, result) {
    const check = await this.leaseStatus(id, peer);
    if (check.status !== "ok") return check;
    const r = check.row;
    const now = this.now();
    const attempts = JSON.parse(r.attempts);
    const mine = [...attempts].reverse().find((a) => a.peer === peer && a.ended === null);
    if (mine) {
      mine.ended = now;
      mine.error = result.ok ? null : result.error;
    }
    this.sql.exec(
      "UPDATE tasks SET state = ?, executed_by = ?, output = ?, output_cid = ?, output_size = ?, error = ?, attempts = ?," +
        " signature = ?, lease_peer = NULL, lease_until = NULL, finished = ?, started = COALESCE(started, ?)," +
        " input = NULL WHERE id = ?",
      result.ok ? "done" : "failed",
      peer,
      result.ok ? result.output ?? null : null,
      result.ok ? result.output_cid ?? null : null,
      result.ok ? result.output_size ?? 0 : 0,
      result.ok ? null : result.error,
      JSON.stringify(attempts),
      result.signature ?? null,
      now,
      now,
      id,
    );
    const cacheKey = this.sql.exec("SELECT cache_key FROM tasks WHERE id = ?", id).toArray()[0].cache_key;
    return { status: "ok", task: this.view(this.row(id)), cacheKey };
  }

  // The submitter (or an admin) cancels `id`: queued or leased, it ends as cancelled and
  // the lease holder's result is then refused (already_finished); a finished task is left
  // as it is. `peer` is the authenticated caller.
  async cancel(id, peer, admin) {
    await this.expireLeases();
    const r = this.row(id);
    if (!r) return { status: "missing" };
    if (!admin && r.submitter !== peer) return { status: "not_submitter" };
    if (r.state === "done" || r.state === "failed" || r.state === "cancelled") {
      return { status: "finished", task: this.view(r) };
    }
    const now = this.now();
    const why = admin && r.submitter !== peer ? "cancelled by an admin" : "cancelled by its submitter";
    const attempts = JSON.parse(r.attempts);
    for (const a of attempts) {
      if (a.ended === null || a.ended === undefined) {
        a.ended = now;
        a.error = why;
      }
    }
    this.sql.exec(
      "UPDATE tasks SET state = 'cancelled', error = ?, attempts = ?, lease_peer = NULL, lease_until = NULL," +
        " waiting_reason = NULL, finished = ?, input = NULL WHERE id = ?",
      why,
      JSON.stringify(attempts),
      now,
      id,
    );
    return { status: "ok", task: this.view(this.row(id)) };
  }

  // Leases that ran out go back to the queue (or fail after MAX_LEASES).
  async expireLeases() {
    this.expireEdgeRuns();
    const now = this.now();
    const rows = this.sql
      .exec("SELECT id, kind, attempts, leases, lease_peer FROM tasks WHERE state = 'running' AND lease_until < ? LIMIT 500", now)
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
            " finished = ?, input = NULL WHERE id = ?",
          `gave up after ${r.leases} expired leases; last holder ${r.lease_peer}`,
          JSON.stringify(attempts),
          now,
          r.id,
        );
      } else {
        this.sql.exec(
          "UPDATE tasks SET state = 'queued', attempts = ?, lease_peer = NULL, lease_until = NULL, waiting_reason = ? WHERE id = ?",
          JSON.stringify(attempts),
          `lease held by ${r.lease_peer} expired; waiting for a pull-mode peer`,
          r.id,
        );
      }
    }
    if (rows.length) await this.syncHints(rows.map((r) => r.kind));
    return rows.length;
  }

  // The next alarm: the earliest lease end, and a clean-up at least every
  // CLEANUP_INTERVAL_S (or `soon` seconds from now).
  async scheduleAlarm(soon = null) {
    const next = this.sql.exec("SELECT MIN(lease_until) AS t FROM tasks WHERE state = 'running' AND lease_until IS NOT NULL").toArray()[0];
    let want = (this.now() + (soon ?? CLEANUP_INTERVAL_S)) * 1000;
    if (next && next.t !== null) want = Math.min(want, Math.ceil(next.t * 1000) + 50);
    const current = await this.ctx.storage.getAlarm();
    if (current === null || current > want) await this.ctx.storage.setAlarm(want);
    this.alarmAt = current === null ? want : Math.min(current, want);
  }

  retentionS() {
    const v = Number(this.env.RETENTION_S);
    return Number.isFinite(v) && v > 0 ? v : DEFAULT_RETENTION_S;
  }

  // One bounded clean-up pass; true if the batch was full (more to do). Outputs and
  // inputs in R2 stay: they are content-addressed objects of the mirror (docs/BRIDGE.md).
  cleanup() {
    const now = this.now();
    return this.sql.exec(
      "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE finished < ? AND state IN ('done', 'failed', 'cancelled') LIMIT ?)",
      now - this.retentionS(),
      CLEANUP_BATCH,
    ).rowsWritten >= CLEANUP_BATCH;
  }

  async alarm() {
    this.alarmAt = null;
    await this.expireLeases();
    await this.flushHints();
    const more = this.cleanup();
    const unsent = this.sql.exec("SELECT 1 FROM hints WHERE sent = 0 LIMIT 1").toArray().length;
    await this.scheduleAlarm(more ? CLEANUP_SOON_S : unsent ? HINT_RETRY_S : null);
  }
}
