// The bridge's control object (one Durable Object, "control"): what is written rarely and
// read through a short per-isolate cache, so it is on no request's path:
//   masters    the team's master bridge key of each epoch (POST /v1/admin/rotate)
//   cache_gen  result-cache generations ("" = all, "<kind>", "<kind>/<version>")
//   hints      the directory for leasing by kind: which task shards hold queued tasks of
//              a kind. A shard sends a hint only when that changes (its first queued task
//              of a kind, or its last one leased), with its own version number, so a late
//              hint never overwrites a newer one.
// `changes` counts writes to masters and cache_gen; isolates compare it to drop their cache.

import { DurableObject } from "cloudflare:workers";

// Masters of this many previous epochs are kept, to tell "stale key" from "wrong key".
export const OLD_EPOCHS = 8;

const SCHEMA = [
  "CREATE TABLE IF NOT EXISTS masters (epoch INTEGER PRIMARY KEY, key TEXT NOT NULL, at REAL NOT NULL)",
  "CREATE TABLE IF NOT EXISTS cache_gen (scope TEXT PRIMARY KEY, gen INTEGER NOT NULL)",
  "CREATE TABLE IF NOT EXISTS hints (kind TEXT NOT NULL, shard INTEGER NOT NULL, has INTEGER NOT NULL," +
    " ver INTEGER NOT NULL, PRIMARY KEY (kind, shard))",
  "CREATE INDEX IF NOT EXISTS hints_has ON hints(has, kind)",
  "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL)",
];

export class Control extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    for (const s of SCHEMA) this.sql.exec(s);
  }

  changes() {
    const row = this.sql.exec("SELECT v FROM meta WHERE k = 'changes'").toArray()[0];
    return row ? row.v : 0;
  }

  bumpChanges() {
    this.sql.exec("INSERT INTO meta(k, v) VALUES ('changes', 1) ON CONFLICT(k) DO UPDATE SET v = v + 1");
  }

  // Bounded: OLD_EPOCHS + 1 masters and one number.
  snapshot() {
    const masters = this.sql.exec("SELECT epoch, key FROM masters ORDER BY epoch DESC LIMIT ?", OLD_EPOCHS + 1).toArray();
    return { masters: masters.map((r) => ({ epoch: r.epoch, key: r.key })), changes: this.changes() };
  }

  // The three generations of (kind, version) and the change counter they belong to.
  gens(kind, version) {
    const rows = this.sql
      .exec("SELECT scope, gen FROM cache_gen WHERE scope IN (?, ?, ?)", "", kind, `${kind}/${version}`)
      .toArray();
    const g = Object.fromEntries(rows.map((r) => [r.scope, r.gen]));
    return { gen: `${g[""] ?? 0}.${g[kind] ?? 0}.${g[`${kind}/${version}`] ?? 0}`, changes: this.changes() };
  }

  bumpCacheGen(scope) {
    this.sql.exec("INSERT INTO cache_gen(scope, gen) VALUES (?, 1) ON CONFLICT(scope) DO UPDATE SET gen = gen + 1", scope);
    this.bumpChanges();
    return this.sql.exec("SELECT gen FROM cache_gen WHERE scope = ?", scope).toArray()[0].gen;
  }

  // current: the epoch the caller's cache believes current (-1: none stored).
  rotate(epoch, keyHex, env0Hex) {
    const rows = this.sql.exec("SELECT epoch, key FROM masters ORDER BY epoch DESC LIMIT 1").toArray();
    const current = rows.length ? rows[0] : env0Hex ? { epoch: 0, key: env0Hex } : null;
    const currentEpoch = current ? current.epoch : -1;
    if (current && epoch === currentEpoch && current.key === keyHex) return { ok: true, epoch };
    if (epoch <= currentEpoch) {
      return { ok: false, code: "epoch_conflict", message: `epoch ${epoch} is not newer than the current epoch ${currentEpoch}`, epoch: currentEpoch };
    }
    this.sql.exec("INSERT INTO masters(epoch, key, at) VALUES (?, ?, ?)", epoch, keyHex, Date.now() / 1000);
    this.sql.exec("DELETE FROM masters WHERE epoch NOT IN (SELECT epoch FROM masters ORDER BY epoch DESC LIMIT ?)", OLD_EPOCHS + 1);
    this.bumpChanges();
    return { ok: true, epoch };
  }

  // hints: [{kind, has, ver}] from shard `shard`; older versions are ignored.
  setHints(shard, hints) {
    for (const h of hints) {
      this.sql.exec(
        "INSERT INTO hints(kind, shard, has, ver) VALUES (?, ?, ?, ?)" +
          " ON CONFLICT(kind, shard) DO UPDATE SET has = excluded.has, ver = excluded.ver WHERE excluded.ver > hints.ver",
        h.kind,
        shard,
        h.has ? 1 : 0,
        h.ver,
      );
    }
    return true;
  }

  // The shards that hold queued tasks of any of `kinds` (at most SHARDS numbers).
  shardsFor(kinds) {
    return this.sql
      .exec("SELECT DISTINCT h.shard AS s FROM hints h JOIN json_each(?) j ON h.kind = j.value WHERE h.has = 1 ORDER BY s", JSON.stringify(kinds))
      .toArray()
      .map((r) => r.s);
  }
}
