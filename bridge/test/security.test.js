// Per-member keys, leases bound to the authenticated peer, key rotation, and the
// issue-19 bounds (cache keys, sizes, paths, internal errors).
import { env, runDurableObjectAlarm, runInDurableObject, SELF } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { b64, call, control, gateFor, KEY_HEX, memberKey, randomHex, shardAt, shardFor, sign } from "./helpers.js";

// CIDv1 raw sha2-256 of `text`, base32 ("bafkrei…").
async function rawCid(text) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text)));
  const bytes = [1, 0x55, 0x12, 0x20, ...digest];
  const alphabet = "abcdefghijklmnopqrstuvwxyz234567";
  let bits = 0;
  let acc = 0;
  let out = "b";
  for (const b of bytes) {
    acc = (acc << 8) | b;
    bits += 8;
    while (bits >= 5) {
      bits -= 5;
      out += alphabet[(acc >> bits) & 31];
    }
    acc &= 0xff;
  }
  if (bits) out += alphabet[(acc << (5 - bits)) & 31];
  return out;
}

async function queueOne(kind, extra = {}, peer = "sec-sub") {
  const r = await call("POST", "/v1/tasks", { kind, params: {}, ...extra }, { peer });
  expect(r.status).toBe(202);
  return r.json.id;
}

describe("per-member keys", () => {
  it("a member key signs only for its own peer id", async () => {
    const keyA = await memberKey(KEY_HEX, "member-a");
    let r = await call("GET", "/v1/tasks?limit=1", undefined, { peer: "member-a", signOpts: { keyHex: keyA } });
    expect(r.status).toBe(200);
    // A's key, naming B: refused
    r = await call("GET", "/v1/tasks?limit=1", undefined, { peer: "member-b", signOpts: { keyHex: keyA } });
    expect(r.status).toBe(401);
    expect(r.json.error.code).toBe("bad_signature");
  });

  it("nobody may sign as the Worker itself (peer id 'bridge')", async () => {
    const r = await call("GET", "/v1/tasks?limit=1", undefined, { peer: "bridge", signOpts: { admin: true } });
    expect(r.status).toBe(401);
    expect(r.json.error.code).toBe("bad_peer");
  });

  it("the master key signs as an admin for any peer id", async () => {
    const r = await call("GET", "/v1/tasks?limit=1", undefined, { peer: "admin-x", signOpts: { admin: true } });
    expect(r.status).toBe(200);
  });

  it("the peer id is in the signed string: changing the header breaks the signature", async () => {
    const headers = await sign({ method: "GET", path: "/v1/tasks?limit=1", peer: "member-c" });
    headers["X-Teammesh-Peer"] = "member-d";
    const res = await SELF.fetch("https://bridge.test/v1/tasks?limit=1", { headers });
    expect(res.status).toBe(401);
  });

  it("the rate limit is charged to the authenticated peer, not a named one", async () => {
    const keyA = await memberKey(KEY_HEX, "rl-attacker");
    for (let i = 0; i < 30; i++) {
      const r = await call("GET", "/v1/tasks?limit=1", undefined, { peer: "rl-victim", signOpts: { keyHex: keyA } });
      expect(r.status).toBe(401);
    }
    const victim = await call("GET", "/v1/tasks?limit=1", undefined, { peer: "rl-victim" });
    expect(victim.status).toBe(200);
  });

  it("admin requests are not rate-limited; member requests are", async () => {
    const codes = [];
    for (let i = 0; i < 30; i++) {
      codes.push((await call("GET", "/v1/tasks?limit=1", undefined, { peer: "rl-admin", signOpts: { admin: true } })).status);
    }
    expect(codes.every((c) => c === 200)).toBe(true);
    let limited = false;
    for (let i = 0; i < 30 && !limited; i++) {
      limited = (await call("GET", "/v1/tasks?limit=1", undefined, { peer: "rl-admin" })).status === 429;
    }
    expect(limited).toBe(true);
  });

  it("nonces are remembered for as long as their timestamp is inside the skew window", async () => {
    const ts = String(Math.floor(Date.now() / 1000));
    const nonce = randomHex();
    const r = await call("GET", "/v1/tasks?limit=1", undefined, { peer: "nonce-ttl", signOpts: { ts, nonce } });
    expect(r.status).toBe(200);
    const until = await runInDurableObject(gateFor("nonce-ttl"), (instance) =>
      instance.sql.exec("SELECT until FROM seen_nonces WHERE nonce = ?", nonce).toArray()[0].until,
    );
    expect(until).toBe(Number(ts) + Number(env.MAX_SKEW_S ?? 300) + 1);
  });
});

describe("results bound to the lease", () => {
  it("only the lease holder may post a result; the executor is the authenticated peer", async () => {
    const id = await queueOne("sec.lease");
    const leased = await call("POST", "/v1/lease", { kinds: ["sec.lease"], max: 1 }, { peer: "holder-a" });
    expect(leased.json.tasks.map((t) => t.id)).toEqual([id]);
    const other = await call("POST", `/v1/tasks/${id}/result`, { ok: true, output: "forged", executor: "holder-a" }, { peer: "member-b" });
    expect(other.status).toBe(403);
    expect(other.json.error.code).toBe("not_lease_holder");
    const mine = await call("POST", `/v1/tasks/${id}/result`, { ok: true, output: "real", executor: "somebody-else" }, { peer: "holder-a" });
    expect(mine.status).toBe(200);
    expect(mine.json.executed_by).toBe("holder-a");
    expect(mine.json.output).toBe("real");
  });

  it("a task never leased takes no result", async () => {
    const id = await queueOne("sec.never");
    const r = await call("POST", `/v1/tasks/${id}/result`, { ok: true, output: 1 }, { peer: "eager" });
    expect(r.status).toBe(409);
    expect(r.json.error.code).toBe("not_leased");
    const t = await call("GET", `/v1/tasks/${id}`, undefined, { peer: "eager" });
    expect(t.json.state).toBe("queued");
  });

  it("a result after the lease expired is refused", async () => {
    const id = await queueOne("sec.late");
    await call("POST", "/v1/lease", { kinds: ["sec.late"] }, { peer: "late" });
    const { stub } = shardFor(id);
    await runInDurableObject(stub, (instance) => {
      instance.sql.exec("UPDATE tasks SET lease_until = ? WHERE id = ?", Date.now() / 1000 - 1, id);
    });
    await runDurableObjectAlarm(stub);
    const r = await call("POST", `/v1/tasks/${id}/result`, { ok: true, output: 1 }, { peer: "late" });
    expect(r.status).toBe(409);
    expect(r.json.error.code).toBe("lease_expired");
  });

  it("a forged result is never cached", async () => {
    const body = { kind: "sec.cache", params: { q: 1 }, input_b64: b64("same input") };
    const first = await call("POST", "/v1/tasks", body, { peer: "sec-c1" });
    expect(first.status).toBe(202);
    await call("POST", "/v1/lease", { kinds: ["sec.cache"] }, { peer: "honest" });
    const forged = await call("POST", `/v1/tasks/${first.json.id}/result`, { ok: true, output: "evil" }, { peer: "forger" });
    expect(forged.status).toBe(403);
    await call("POST", `/v1/tasks/${first.json.id}/result`, { ok: true, output: "good" }, { peer: "honest" });
    const again = await call("POST", "/v1/tasks", body, { peer: "sec-c2" });
    expect(again.json.cached).toBe(true);
    expect(again.json.output).toBe("good");
  });
});

describe("cache keys cover the input", () => {
  it("two queued tasks that differ only in input_cid are two tasks", async () => {
    const [cidA, cidB] = [await rawCid("file a"), await rawCid("file b")];
    const a = await call("POST", "/v1/tasks", { kind: "sec.cid", params: {}, input_cid: cidA }, { peer: "cid-1" });
    expect(a.status).toBe(202);
    await call("POST", "/v1/lease", { kinds: ["sec.cid"] }, { peer: "cid-worker" });
    const done = await call("POST", `/v1/tasks/${a.json.id}/result`, { ok: true, output: "output of a" }, { peer: "cid-worker" });
    expect(done.json.state).toBe("done");
    const b = await call("POST", "/v1/tasks", { kind: "sec.cid", params: {}, input_cid: cidB }, { peer: "cid-2" });
    expect(b.status).toBe(202);
    expect(b.json.cached).toBe(false);
    const a2 = await call("POST", "/v1/tasks", { kind: "sec.cid", params: {}, input_cid: cidA }, { peer: "cid-3" });
    expect(a2.json.cached).toBe(true);
    expect(a2.json.output).toBe("output of a");
  });

  it("a portable task whose input CID is not in the R2 mirror is queued for pull-mode peers", async () => {
    const cid = await rawCid("only on the mesh");
    const r = await call("POST", "/v1/tasks", { kind: "hash.sha256", params: {}, input_cid: cid }, { peer: "cid-5" });
    expect(r.status).toBe(202);
    expect(r.json.state).toBe("queued");
    expect(r.json.waiting_reason).toContain("not in the R2 mirror");
    const leased = await call("POST", "/v1/lease", { kinds: ["hash.sha256"] }, { peer: "cid-puller" });
    expect(leased.json.tasks.map((t) => [t.id, t.input_cid, t.input_b64])).toEqual([[r.json.id, cid, ""]]);
    const strict = await call("POST", "/v1/tasks", { kind: "hash.sha256", params: {}, input_cid: cid, queue: false }, { peer: "cid-5" });
    expect(strict.status).toBe(422);
    expect(strict.json.error.code).toBe("cid_not_found");
  });

  it("a task with a file param ({$cid}) is never run at the edge: queued with its params, one task per file", async () => {
    const [cidA, cidB] = [await rawCid("param file a"), await rawCid("param file b")];
    const a = await call("POST", "/v1/tasks", { kind: "hash.sha256", input_b64: "", params: { extra: { $cid: cidA } } }, { peer: "cidp-1" });
    expect(a.status).toBe(202);
    expect(a.json.state).toBe("queued");
    expect(a.json.waiting_reason).toContain("param 'extra' is a file");
    const leased = await call("POST", "/v1/lease", { kinds: ["hash.sha256"] }, { peer: "cidp-puller" });
    const mine = leased.json.tasks.filter((t) => t.id === a.json.id);
    expect(mine.map((t) => t.params)).toEqual([{ extra: { $cid: cidA } }]);
    const done = await call("POST", `/v1/tasks/${a.json.id}/result`, { ok: true, output: "digest of a" }, { peer: "cidp-puller" });
    expect(done.json.state).toBe("done");
    const b = await call("POST", "/v1/tasks", { kind: "hash.sha256", input_b64: "", params: { extra: { $cid: cidB } } }, { peer: "cidp-2" });
    expect(b.status).toBe(202);
    expect(b.json.cached).toBe(false);
    const strict = await call("POST", "/v1/tasks", { kind: "hash.sha256", input_b64: "", params: { extra: { $cid: cidB } }, queue: false }, { peer: "cidp-2" });
    expect(strict.status).toBe(422);
    expect(strict.json.error.code).toBe("not_portable");
  });

  it("refuses an input_cid that is not a CID", async () => {
    const r = await call("POST", "/v1/tasks", { kind: "sec.cid", params: {}, input_cid: "bnotacid0000" }, { peer: "cid-4" });
    expect(r.status).toBe(400);
  });
});

describe("key rotation", () => {
  it("after rotate, old keys get stale_key with the epoch and new member keys work", async () => {
    const newMaster = randomHex(32);
    try {
      const byMember = await call("POST", "/v1/admin/rotate", { epoch: 1, key: newMaster }, { peer: "rot-member" });
      expect(byMember.status).toBe(403);
      expect(byMember.json.error.code).toBe("admin_only");
      const r = await call("POST", "/v1/admin/rotate", { epoch: 1, key: newMaster }, { peer: "rot-admin", signOpts: { admin: true } });
      expect(r.status).toBe(200);
      expect(r.json).toEqual({ epoch: 1 });
      const stale = await call("GET", "/v1/tasks?limit=1", undefined, { peer: "rot-member" });
      expect(stale.status).toBe(401);
      expect(stale.json.code).toBe("stale_key");
      expect(stale.json.epoch).toBe(1);
      expect(stale.json.error.code).toBe("stale_key");
      const oldAdmin = await call("GET", "/v1/tasks?limit=1", undefined, { peer: "rot-admin", signOpts: { admin: true } });
      expect(oldAdmin.json.code).toBe("stale_key");
      const fresh = await call("GET", "/v1/tasks?limit=1", undefined, { peer: "rot-member", signOpts: { master: newMaster } });
      expect(fresh.status).toBe(200);
      const wrong = await call("GET", "/v1/tasks?limit=1", undefined, { peer: "rot-member", signOpts: { keyHex: randomHex(32) } });
      expect(wrong.json.error.code).toBe("bad_signature");
      // an older or equal epoch with another key is a conflict; the same rotation again is fine
      const again = await call("POST", "/v1/admin/rotate", { epoch: 1, key: newMaster }, { peer: "rot-admin", signOpts: { admin: true, master: newMaster } });
      expect(again.status).toBe(200);
      const conflict = await call("POST", "/v1/admin/rotate", { epoch: 1, key: randomHex(32) }, { peer: "rot-admin", signOpts: { admin: true, master: newMaster } });
      expect(conflict.status).toBe(409);
      expect(conflict.json.error.code).toBe("epoch_conflict");
    } finally {
      await runInDurableObject(control(), (instance) => {
        instance.sql.exec("DELETE FROM masters");
      });
    }
    const back = await call("GET", "/v1/tasks?limit=1", undefined, { peer: "rot-member" });
    expect(back.status).toBe(200);
  });
});

describe("bounds", () => {
  it("a malformed %-escape in a path is a 400", async () => {
    const r = await call("GET", "/v1/tasks/%E0%A4%A", undefined, { peer: "pct" });
    expect(r.status).toBe(400);
    expect(r.json.error.code).toBe("bad_path");
  });

  it("500 answers do not echo internal messages", async () => {
    const { stub } = shardFor("x");
    await runInDurableObject(stub, (instance) => instance.sql.exec("ALTER TABLE tasks RENAME TO tasks_hidden"));
    try {
      const r = await call("GET", "/v1/tasks/x", undefined, { peer: "err500" });
      expect(r.status).toBe(500);
      expect(r.json.error.code).toBe("internal");
      expect(r.text).not.toContain("tasks");
      expect(r.text).not.toContain("SQL");
    } finally {
      await runInDurableObject(stub, (instance) => instance.sql.exec("ALTER TABLE tasks_hidden RENAME TO tasks"));
    }
  });

  it("the lease's version filter runs before the limit", async () => {
    for (let i = 0; i < 21; i++) await queueOne("sec.ver", { version: "1" }, `ver-${i}`);
    const v2 = await queueOne("sec.ver", { version: "2" }, "ver-x");
    const r = await call("POST", "/v1/lease", { kinds: { "sec.ver": "2" }, max: 1 }, { peer: "ver-puller" });
    expect(r.json.tasks.map((t) => t.id)).toEqual([v2]);
  });

  it("a lease may name hundreds of kinds", async () => {
    const kinds = Array.from({ length: 150 }, (_, i) => `sec.many${i}`);
    const id = await queueOne("sec.many149");
    const r = await call("POST", "/v1/lease", { kinds, max: 5 }, { peer: "many" });
    expect(r.status).toBe(200);
    expect(r.json.tasks.map((t) => t.id)).toEqual([id]);
  });

  it("a lease answer is bounded in input bytes", async () => {
    const big = "x".repeat(3.5 * 1024 * 1024);
    for (let i = 0; i < 3; i++) await queueOne("sec.bigin", { input_b64: btoa(big) }, `bigin-${i}`);
    const r = await call("POST", "/v1/lease", { kinds: ["sec.bigin"], max: 3 }, { peer: "bigin" });
    expect(r.status).toBe(200);
    expect(r.json.tasks.length).toBe(2);
    expect(r.json.tasks.map((t) => atob(t.input_b64) === big)).toEqual([true, true]);
  });

  it("a list answer is bounded in bytes", async () => {
    const out = "y".repeat(3 * 1024 * 1024);
    for (let i = 0; i < 3; i++) {
      const id = await queueOne("sec.biglist", { params: { i } }, `biglist-${i}`);
      await call("POST", "/v1/lease", { kinds: ["sec.biglist"] }, { peer: "biglist" });
      expect((await call("POST", `/v1/tasks/${id}/result`, { ok: true, output: out }, { peer: "biglist" })).status).toBe(200);
    }
    const r = await call("GET", "/v1/tasks?kind=sec.biglist&limit=10", undefined, { peer: "biglist" });
    expect(r.status).toBe(200);
    expect(r.json.tasks.length).toBe(1);
    expect(r.json.tasks[0].output).toBe(out);
    expect(r.json.more).toBe(true);
  });

  it("a 3 MB UTF-8 output fits (rows stay under SQLite's limit)", async () => {
    const id = await queueOne("sec.wide");
    await call("POST", "/v1/lease", { kinds: ["sec.wide"] }, { peer: "wide" });
    const output = "€".repeat(1_000_000);
    const r = await call("POST", `/v1/tasks/${id}/result`, { ok: true, output }, { peer: "wide" });
    expect(r.status).toBe(200);
    const t = await call("GET", `/v1/tasks/${id}`, undefined, { peer: "wide" });
    expect(t.json.output).toBe(output);
  });

  it("params beyond the row budget are refused with 413, not a 500", async () => {
    const r = await call("POST", "/v1/tasks", { kind: "sec.params", params: { blob: "z".repeat(2.5 * 1024 * 1024) } }, { peer: "params" });
    expect(r.status).toBe(413);
    expect(r.json.error.code).toBe("params_too_large");
  });

  it("finished tasks past the retention are cleaned up by the shard's alarm, old nonces by the gate's", async () => {
    const now = Date.now() / 1000;
    const retention = Number(env.RETENTION_S ?? 7 * 86400);
    const old = { kind: "sec.retention", version: "1", params: "{}", priority: 0, state: "done", submitted: now - retention - 10 };
    const rows = [
      [{ ...old, id: "ret-old", output: "1", finished: now - retention - 5 }, null],
      [{ ...old, id: "ret-new", output: "1", finished: now - 5 }, null],
      [{ ...old, id: "ret-queued", state: "queued" }, { inline: new Uint8Array(3), key: null, size: 3 }],
    ];
    for (const [task, input] of rows) {
      const { index, stub } = shardFor(task.id);
      await runInDurableObject(stub, (instance) => instance.put(index, task, input));
    }
    for (const id of ["ret-old", "ret-new", "ret-queued"]) await runDurableObjectAlarm(shardFor(id).stub);
    const left = [];
    for (const id of ["ret-old", "ret-new", "ret-queued"]) {
      const n = await runInDurableObject(shardFor(id).stub, (i) => i.sql.exec("SELECT COUNT(*) AS n FROM tasks WHERE id = ?", id).toArray()[0].n);
      if (n) left.push(id);
    }
    expect(left).toEqual(["ret-new", "ret-queued"]);
    await runInDurableObject(gateFor("ret-peer"), (i) => {
      i.sql.exec("INSERT OR REPLACE INTO seen_nonces(nonce, until) VALUES ('ret-nonce', ?), ('ret-fresh', ?)", now - 1, now + 600);
      return i.ctx.storage.setAlarm(Date.now() + 60_000);
    });
    expect(await runDurableObjectAlarm(gateFor("ret-peer"))).toBe(true);
    const nonces = await runInDurableObject(gateFor("ret-peer"), (i) => i.sql.exec("SELECT nonce FROM seen_nonces ORDER BY nonce").toArray().map((r) => r.nonce));
    expect(nonces).toEqual(["ret-fresh"]);
  });

  it("inputs over a kind's edge limit are queued for pull-mode peers, not run in the isolate", async () => {
    const big = btoa("a,b\n".repeat((1024 * 1024) / 4 + 1));
    const r = await call("POST", "/v1/tasks", { kind: "csv.summary", input_b64: big, params: {} }, { peer: "edge-big" });
    expect(r.status).toBe(202);
    expect(r.json.state).toBe("queued");
    expect(r.json.waiting_reason).toContain("EDGE_INPUT_BYTES");
    const refused = await call("POST", "/v1/tasks", { kind: "csv.summary", input_b64: big, params: {}, queue: false }, { peer: "edge-big" });
    expect(refused.status).toBe(422);
    const small = await call("POST", "/v1/tasks", { kind: "csv.summary", input_b64: btoa("a,b\n1,2\n"), params: {}, no_cache: true }, { peer: "edge-big" });
    expect(small.json.state).toBe("done");
  });

  it("a portable run is recorded before it runs; a retry of one that never finished is queued", async () => {
    // what a killed isolate leaves behind: the record made before the run
    const now = Date.now() / 1000;
    for (const [id, started] of [["edge-killed", now - 5], ["edge-stale", now - 3600]]) {
      const { index, stub } = shardFor(id);
      await runInDurableObject(stub, (instance) =>
        instance.put(index, { id, kind: "text.stats", version: "1", params: "{}", priority: 0, state: "running",
          executed_by: "bridge", started, submitted: started,
          attempts: JSON.stringify([{ peer: "bridge", started, ended: null, error: null }]) }, null));
    }
    const retry = await call("POST", "/v1/tasks", { id: "edge-killed", kind: "text.stats", input_b64: btoa("one two"), params: {} }, { peer: "edge-retry" });
    expect(retry.status).toBe(202);
    expect(retry.json.state).toBe("queued");
    const leased = await call("POST", "/v1/lease", { kinds: ["text.stats"], max: 5 }, { peer: "edge-puller" });
    const mine = leased.json.tasks.find((t) => t.id === "edge-killed");
    expect(atob(mine.input_b64)).toBe("one two");
    const stale = await call("GET", "/v1/tasks/edge-stale", undefined, { peer: "edge-retry" });
    expect(stale.json.state).toBe("failed");
    expect(stale.json.error).toContain("CPU or memory limit");
    // an ordinary run leaves a finished record
    const ok = await call("POST", "/v1/tasks", { id: "edge-ok", kind: "text.stats", input_b64: btoa("x"), params: {}, no_cache: true }, { peer: "edge-retry" });
    expect(ok.json.state).toBe("done");
    expect((await call("GET", "/v1/tasks/edge-ok", undefined, { peer: "edge-retry" })).json.state).toBe("done");
  });
});
