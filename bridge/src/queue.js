// The bridge's one Durable Object (SQLite storage): the task table (every task the
// bridge saw, queued ones for pull-mode peers included), leases bound to the
// authenticated peer that holds them, the team's master bridge key and its epoch
// (rotation), request authentication (signature, nonce memory, per-peer token buckets),
// and the result cache's generation counters.
//
// Task inputs and large outputs are stored in chunks of at most 1 MiB (SQLite values and
// rows are capped at 2 MB in Durable Objects); inline outputs are at most INLINE_OUTPUT
// bytes, so every row stays well below the cap.

import { DurableObject } from "cloudflare:workers";
import { deriveMemberKey, importHmac, masterFromHex } from "./auth.js";
import { fromHex, hex } from "./util.js";

const CHUNK = 1 << 20;
const INLINE_OUTPUT = 256 * 1024; // bytes of UTF-8; larger outputs go to chunks
export const MAX_LEASES = 5;
// One lease answer carries at most this many input bytes (at least one task), one list
// answer at most this many bytes of outputs and params (at least one row): both stay
// far below the 32 MiB RPC limit and the isolate's 128 MB.
export const LEASE_BYTES = 8 * 1024 * 1024;
export const LIST_BYTES = 4 * 1024 * 1024;
// Masters of this many previous epochs are kept, to tell "stale key" from "wrong key".
const OLD_EPOCHS = 8;
const MEMBER_KEY_CACHE = 1024;
// Clean-up (by alarm): finished tasks older than RETENTION_S (var, default 7 days) and
// their blobs, token buckets idle for an hour, expired nonces; at most CLEANUP_BATCH rows
// of each per run, again CLEANUP_SOON_S later while there is more, else every
// CLEANUP_INTERVAL_S.
const DEFAULT_RETENTION_S = 7 * 86400;
const CLEANUP_BATCH = 500;
const CLEANUP_INTERVAL_S = 3600;
const CLEANUP_SOON_S = 1;
const BUCKET_IDLE_S = 3600;
// A portable run is recorded ("running", executed_by "bridge", no lease) before it starts.
// One still running after EDGE_RUN_S (var; default 120 s, four times the default CPU
// limit) died with its isolate (CPU or memory limit): it fails with that reason, unless
// the client retries first (then it is queued for pull-mode peers, see requeueEdge).
const DEFAULT_EDGE_RUN_S = 120;
const EDGE_RUNNING = "state = 'running' AND lease_peer IS NULL AND executed_by = 'bridge'";

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
CREATE INDEX IF NOT EXISTS tasks_seq ON tasks(seq);
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(finished);
DROP TABLE IF EXISTS nonces;
CREATE TABLE IF NOT EXISTS seen_nonces (nonce TEXT PRIMARY KEY, until REAL NOT NULL);
CREATE INDEX IF NOT EXISTS seen_nonces_until ON seen_nonces(until);
CREATE TABLE IF NOT EXISTS buckets (peer TEXT PRIMARY KEY, tokens REAL NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS masters (epoch INTEGER PRIMARY KEY, key TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS cache_gen (scope TEXT PRIMARY KEY, gen INTEGER NOT NULL);
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

  // --- keys: the master of each epoch -------------------------------------------------
  // Epoch 0 is env.BRIDGE_KEY; POST /v1/admin/rotate stores later ones here, and from
  // then on the stored master of the highest epoch is the team's master.
  async keys() {
    if (this._keys) return this._keys;
    const rows = this.sql.exec("SELECT epoch, key FROM masters ORDER BY epoch DESC LIMIT ?", OLD_EPOCHS + 1).toArray();
    const all = rows.map((r) => ({ epoch: r.epoch, raw: fromHex(r.key) }));
    const env0 = masterFromHex(this.env.BRIDGE_KEY);
    if (env0 && !all.some((k) => k.epoch === 0) && all.length <= OLD_EPOCHS) all.push({ epoch: 0, raw: env0 });
    if (!all.length) return null;
    for (const k of all) k.key = await importHmac(k.raw);
    this._keys = { current: all[0], old: all.slice(1) };
    this._memberKeys = new Map();
    return this._keys;
  }

  async memberKey(master, peer) {
    const id = `${master.epoch}/${peer}`;
    let key = this._memberKeys.get(id);
    if (!key) {
      if (this._memberKeys.size >= MEMBER_KEY_CACHE) this._memberKeys.clear();
      key = await importHmac(await deriveMemberKey(master.key, peer));
      this._memberKeys.set(id, key);
    }
    return key;
  }

  // "member" (signed with K_P of this master), "admin" (signed with the master), or null
  async roleUnder(master, peer, mac, message) {
    if (await crypto.subtle.verify("HMAC", await this.memberKey(master, peer), mac, message)) return "member";
    if (await crypto.subtle.verify("HMAC", master.key, mac, message)) return "admin";
    return null;
  }

  epoch() {
    return this._keys ? this._keys.current.epoch : null;
  }

  async rotate(epoch, keyHex) {
    const keys = await this.keys();
    const current = keys ? keys.current.epoch : -1;
    if (epoch === current && keys && hex(keys.current.raw) === keyHex) return { ok: true, epoch };
    if (epoch <= current) {
      return { ok: false, code: "epoch_conflict", message: `epoch ${epoch} is not newer than the current epoch ${current}`, epoch: current };
    }
    this.sql.exec("INSERT INTO masters(epoch, key, at) VALUES (?, ?, ?)", epoch, keyHex, this.now());
    // keep the current master and OLD_EPOCHS before it
    this.sql.exec(
      "DELETE FROM masters WHERE epoch NOT IN (SELECT epoch FROM masters ORDER BY epoch DESC LIMIT ?)",
      OLD_EPOCHS + 1,
    );
    this._keys = null;
    await this.keys();
    return { ok: true, epoch };
  }

  // --- admission: signature, replay protection and rate limiting -----------------------
  // auth: {peer, ts, nonce, sig, message} from auth.js parseAuth. The rate limit is
  // charged to the authenticated peer only, after the signature checks out.
  async authorize(auth, skew, rate, burst) {
    const keys = await this.keys();
    if (!keys) {
      return { ok: false, status: 503, code: "not_configured", message: "BRIDGE_KEY is not a hex key of at least 16 bytes; set it with `wrangler secret put BRIDGE_KEY` (or .dev.vars)" };
    }
    const mac = fromHex(auth.sig);
    const message = new TextEncoder().encode(auth.message);
    const role = await this.roleUnder(keys.current, auth.peer, mac, message);
    if (!role) {
      for (const old of keys.old) {
        if (await this.roleUnder(old, auth.peer, mac, message)) {
          return {
            ok: false, status: 401, code: "stale_key", epoch: keys.current.epoch,
            message: `the request is signed with a key of epoch ${old.epoch}; the team's bridge key is now at epoch ${keys.current.epoch}: get the new key from a team admin`,
          };
        }
      }
      return { ok: false, status: 401, code: "bad_signature", message: "signature does not match (wrong key or peer id, or the request was altered)" };
    }
    const now = this.now();
    const peer = auth.peer;
    // Admin requests (signed with the master) are not rate-limited: whoever holds the
    // master can derive every member's key anyway, so a bucket would protect nothing.
    const limited = role === "member";
    const row = limited ? this.sql.exec("SELECT tokens, at FROM buckets WHERE peer = ?", peer).toArray()[0] : null;
    const tokens = row ? Math.min(burst, row.tokens + (now - row.at) * rate) : burst;
    if (limited && tokens < 1) {
      this.sql.exec("INSERT OR REPLACE INTO buckets(peer, tokens, at) VALUES (?, ?, ?)", peer, tokens, now);
      return {
        ok: false, status: 429, code: "rate_limited", retryAfter: Math.max(1, Math.ceil((1 - tokens) / rate)),
        message: `peer ${peer} exceeded ${rate} requests/s (burst ${burst})`,
      };
    }
    // A nonce is remembered until its timestamp leaves the skew window (ts + skew): a
    // replay after that fails the timestamp check, so the memory follows MAX_SKEW_S.
    this.sql.exec(
      "DELETE FROM seen_nonces WHERE nonce IN (SELECT nonce FROM seen_nonces WHERE until < ? ORDER BY until LIMIT 200)",
      now,
    );
    if (this.sql.exec("SELECT 1 FROM seen_nonces WHERE nonce = ?", auth.nonce).toArray().length) {
      return { ok: false, status: 401, code: "replayed_nonce", message: "this nonce was already used; sign every request with a fresh nonce" };
    }
    this.sql.exec("INSERT INTO seen_nonces(nonce, until) VALUES (?, ?)", auth.nonce, auth.ts + skew + 1);
    if (limited) this.sql.exec("INSERT OR REPLACE INTO buckets(peer, tokens, at) VALUES (?, ?, ?)", peer, tokens - 1, now);
    return { ok: true, peer, role, epoch: keys.current.epoch };
  }

  // --- result cache generations ---------------------------------------------------------
  // Invalidation bumps a counter ("" = all, "<kind>", "<kind>/<version>"); cache keys
  // include the three counters, so an invalidation is O(1) and takes effect at once.
  cacheGen(kind, version) {
    const rows = this.sql
      .exec("SELECT scope, gen FROM cache_gen WHERE scope IN (?, ?, ?)", "", kind, `${kind}/${version}`)
      .toArray();
    const g = Object.fromEntries(rows.map((r) => [r.scope, r.gen]));
    return `${g[""] ?? 0}.${g[kind] ?? 0}.${g[`${kind}/${version}`] ?? 0}`;
  }

  bumpCacheGen(scope) {
    this.sql.exec(
      "INSERT INTO cache_gen(scope, gen) VALUES (?, 1) ON CONFLICT(scope) DO UPDATE SET gen = gen + 1",
      scope,
    );
    return this.sql.exec("SELECT gen FROM cache_gen WHERE scope = ?", scope).toArray()[0].gen;
  }

  // One round trip for submit: the stored task with this id (if any) and the cache
  // generation of (kind, version).
  prepare(id, kind, version) {
    const existing = id === null ? null : this.get(id);
    const edgeRunning = !!existing && existing.state === "running" && existing.lease_peer === null && existing.executed_by === "bridge";
    return { existing, edgeRunning, gen: this.cacheGen(kind, version) };
  }

  // A portable run that finished: only a row still in its edge-running state is updated
  // (a retry may have queued it for pull-mode peers meanwhile).
  finishEdge(id, result) {
    this.sql.exec(
      `UPDATE tasks SET state = ?, output = ?, output_chunks = ?, error = ?, attempts = ?, finished = ? WHERE id = ? AND ${EDGE_RUNNING}`,
      result.state,
      ...this.setOutput(id, result.output),
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
  requeueEdge(id, input, reason) {
    const r = this.row(id);
    if (!r || r.state !== "running" || r.lease_peer !== null || r.executed_by !== "bridge") return this.view(r);
    const now = this.now();
    const attempts = JSON.parse(r.attempts);
    for (const a of attempts) if (a.ended === null) Object.assign(a, { ended: now, error: reason });
    this.sql.exec(
      "UPDATE tasks SET state = 'queued', executed_by = NULL, attempts = ?, waiting_reason = ?, input_size = ? WHERE id = ?",
      JSON.stringify(attempts),
      `${reason}; waiting for a pull-mode peer`,
      input.length,
      id,
    );
    this.putBlob(id, "in", input);
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
      this.sql.exec(
        "UPDATE tasks SET state = 'failed', error = ?, attempts = ?, finished = ? WHERE id = ?",
        error,
        JSON.stringify(attempts),
        now,
        r.id,
      );
    }
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
    // UTF-8 can be 3 bytes per UTF-16 unit: measure bytes, not .length
    if (outputText.length <= INLINE_OUTPUT / 3) return [outputText, 0];
    const bytes = new TextEncoder().encode(outputText);
    if (bytes.length <= INLINE_OUTPUT) return [outputText, 0];
    const n = this.putBlob(id, "out", bytes);
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
  async put(task, input) {
    this.expireLeases();
    if (!this._cleanupScheduled) await this.scheduleAlarm();
    const existing = this.row(task.id);
    if (existing) return { existing: true, task: this.view(existing) };
    // MAX(seq) is answered from the tasks_seq index, not a table scan
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

  // At most `limit` rows and about LIST_BYTES of outputs and params (at least one row);
  // {tasks, more}: more is true when rows were left out for the byte budget.
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
    const sizes =
      `SELECT id, output_chunks, LENGTH(CAST(COALESCE(output, '') AS BLOB)) + LENGTH(CAST(params AS BLOB)) AS bytes FROM tasks` +
      ` ${where.length ? "WHERE " + where.join(" AND ") : ""} ORDER BY ${order} LIMIT ?`;
    const out = [];
    let total = 0;
    let more = false;
    for (const r of this.sql.exec(sizes, ...args, limit).toArray()) {
      let bytes = r.bytes;
      if (r.output_chunks > 0) {
        bytes += this.sql.exec("SELECT COALESCE(SUM(LENGTH(data)), 0) AS n FROM blobs WHERE task_id = ? AND part = 'out'", r.id).toArray()[0].n;
      }
      if (out.length && total + bytes > LIST_BYTES) {
        more = true;
        break;
      }
      total += bytes;
      out.push(this.view(this.row(r.id)));
    }
    return { tasks: out, more };
  }

  counts() {
    const rows = this.sql.exec("SELECT state, COUNT(*) AS n FROM tasks GROUP BY state").toArray();
    return Object.fromEntries(rows.map((r) => [r.state, r.n]));
  }

  // kinds: {name: version|null}. Leases up to `max` queued tasks (and about LEASE_BYTES
  // of inputs, at least one task) to the authenticated `peer`; returns them with inputs.
  // The version filter is in the query (before LIMIT), and the kinds travel as one JSON
  // parameter, so any number of kinds stays within SQLite's parameter limit.
  async lease(peer, kinds, max, leaseS) {
    this.expireLeases();
    if (!Object.keys(kinds).length) return [];
    const now = this.now();
    const rows = this.sql
      .exec(
        "SELECT t.id, t.input_size FROM tasks t JOIN json_each(?) j ON t.kind = j.key" +
          " WHERE t.state = 'queued' AND (j.value IS NULL OR j.value = t.version)" +
          " ORDER BY t.priority DESC, t.seq LIMIT ?",
        JSON.stringify(kinds),
        max,
      )
      .toArray();
    const out = [];
    let bytes = 0;
    for (const { id, input_size: size } of rows) {
      if (out.length && bytes + size > LEASE_BYTES) break;
      bytes += size;
      const r = this.row(id);
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
        id,
      );
      out.push({ task: this.view(this.row(id)), input: this.getBlob(id, "in"), leaseUntil: until });
    }
    await this.scheduleAlarm();
    return out;
  }

  // result: {ok, outputText, error, signature}. Accepted only from `peer`, the
  // authenticated holder of the task's current lease; `executed_by` is that peer.
  complete(id, peer, result) {
    this.expireLeases();
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
    const now = this.now();
    const attempts = JSON.parse(r.attempts);
    const mine = [...attempts].reverse().find((a) => a.peer === peer && a.ended === null);
    if (mine) {
      mine.ended = now;
      mine.error = result.ok ? null : result.error;
    }
    const [outText, chunks] = this.setOutput(id, result.ok ? result.outputText : null);
    this.sql.exec(
      "UPDATE tasks SET state = ?, executed_by = ?, output = ?, output_chunks = ?, error = ?, attempts = ?," +
        " signature = ?, lease_peer = NULL, lease_until = NULL, finished = ?, started = COALESCE(started, ?)" +
        " WHERE id = ?",
      result.ok ? "done" : "failed",
      peer,
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
    return { status: "ok", task, cacheKey: this.cacheKeyOf(id) };
  }

  cacheKeyOf(id) {
    const rows = this.sql.exec("SELECT cache_key FROM tasks WHERE id = ?", id).toArray();
    return rows.length ? rows[0].cache_key : null;
  }

  // Leases that ran out go back to the queue (or fail after MAX_LEASES).
  expireLeases() {
    this.expireEdgeRuns();
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

  // The next alarm: the earliest lease end, and a clean-up at least every
  // CLEANUP_INTERVAL_S (or `soon` seconds from now).
  async scheduleAlarm(soon = null) {
    const next = this.sql
      .exec("SELECT MIN(lease_until) AS t FROM tasks WHERE state = 'running' AND lease_until IS NOT NULL")
      .toArray()[0];
    let want = (this.now() + (soon ?? CLEANUP_INTERVAL_S)) * 1000;
    if (next && next.t !== null) want = Math.min(want, Math.ceil(next.t * 1000) + 50);
    const current = await this.ctx.storage.getAlarm();
    if (current === null || current > want) await this.ctx.storage.setAlarm(want);
    this._cleanupScheduled = true;
  }

  retentionS() {
    const v = Number(this.env.RETENTION_S);
    return Number.isFinite(v) && v > 0 ? v : DEFAULT_RETENTION_S;
  }

  // One bounded clean-up pass; true if a batch was full (more to do).
  cleanup() {
    const now = this.now();
    const old = this.sql
      .exec(
        "SELECT id FROM tasks WHERE finished < ? AND state IN ('done', 'failed', 'cancelled') LIMIT ?",
        now - this.retentionS(),
        CLEANUP_BATCH,
      )
      .toArray();
    for (const { id } of old) {
      this.sql.exec("DELETE FROM blobs WHERE task_id = ?", id);
      this.sql.exec("DELETE FROM tasks WHERE id = ?", id);
    }
    const buckets = this.sql.exec(
      "DELETE FROM buckets WHERE peer IN (SELECT peer FROM buckets WHERE at < ? LIMIT ?)",
      now - BUCKET_IDLE_S,
      CLEANUP_BATCH,
    ).rowsWritten;
    const nonces = this.sql.exec(
      "DELETE FROM seen_nonces WHERE nonce IN (SELECT nonce FROM seen_nonces WHERE until < ? ORDER BY until LIMIT ?)",
      now,
      CLEANUP_BATCH,
    ).rowsWritten;
    return old.length === CLEANUP_BATCH || buckets >= CLEANUP_BATCH || nonces >= CLEANUP_BATCH;
  }

  async alarm() {
    this.expireLeases();
    const more = this.cleanup();
    await this.scheduleAlarm(more ? CLEANUP_SOON_S : null);
  }
}
