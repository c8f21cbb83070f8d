// One Durable Object per authenticated peer ("peer/<id>"): the nonces it used (replay
// protection) and its token bucket (rate limit). Requests of different members never
// meet here, and none of this is on the task shards' path.
//
// Only the nonces are stored: a replay must fail even after the object restarts. The
// bucket is kept in memory: if the object is evicted, the peer starts again with a full
// burst, which a rate limit can tolerate (it bounds load, it does not authenticate).

import { DurableObject } from "cloudflare:workers";

const SCHEMA = "CREATE TABLE IF NOT EXISTS seen_nonces (nonce TEXT PRIMARY KEY, until REAL NOT NULL)";
const INDEX = "CREATE INDEX IF NOT EXISTS seen_nonces_until ON seen_nonces(until)";
const CLEANUP_BATCH = 500;

export class PeerGate extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.sql.exec(SCHEMA);
    this.sql.exec(INDEX);
    this.tokens = null;
    this.at = 0;
    this.alarmAt = null;
  }

  // nonce: lower-case hex; until: when its timestamp leaves the skew window (a replay
  // after that fails the timestamp check, so the memory follows MAX_SKEW_S).
  // limited: false for admin requests (whoever holds the master can derive every member's
  // key, so a bucket would protect nothing).
  async admit(nonce, until, limited, rate, burst, peer) {
    const now = Date.now() / 1000;
    if (limited) {
      const tokens = this.tokens === null ? burst : Math.min(burst, this.tokens + (now - this.at) * rate);
      this.tokens = tokens;
      this.at = now;
      if (tokens < 1) {
        return {
          ok: false, status: 429, code: "rate_limited", retryAfter: Math.max(1, Math.ceil((1 - tokens) / rate)),
          message: `peer ${peer} exceeded ${rate} requests/s (burst ${burst})`,
        };
      }
    }
    if (this.sql.exec("SELECT 1 FROM seen_nonces WHERE nonce = ? AND until >= ?", nonce, now).toArray().length) {
      return { ok: false, status: 401, code: "replayed_nonce", message: "this nonce was already used; sign every request with a fresh nonce" };
    }
    this.sql.exec("INSERT OR REPLACE INTO seen_nonces(nonce, until) VALUES (?, ?)", nonce, until);
    if (limited) this.tokens -= 1;
    if (this.alarmAt === null || this.alarmAt > until * 1000) {
      this.alarmAt = Math.ceil(until * 1000) + 50;
      const current = await this.ctx.storage.getAlarm();
      if (current === null || current > this.alarmAt) await this.ctx.storage.setAlarm(this.alarmAt);
    }
    return { ok: true };
  }

  // Expired nonces go in bounded batches; the next alarm is the earliest left.
  async alarm() {
    const now = Date.now() / 1000;
    this.sql.exec(
      "DELETE FROM seen_nonces WHERE nonce IN (SELECT nonce FROM seen_nonces WHERE until < ? ORDER BY until LIMIT ?)",
      now,
      CLEANUP_BATCH,
    );
    const next = this.sql.exec("SELECT MIN(until) AS t FROM seen_nonces").toArray()[0].t;
    this.alarmAt = null;
    if (next !== null) {
      this.alarmAt = Math.max(Date.now() + 1000, Math.ceil(next * 1000) + 50);
      await this.ctx.storage.setAlarm(this.alarmAt);
    }
  }
}
