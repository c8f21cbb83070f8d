// Issue 19, scale-out: task shards by hashed id with a directory for leasing by kind,
// nonces and rate limits in per-peer gates, large inputs and outputs in R2 by CID.
// vitest.config.js sets SHARDS=4.
import { env, runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { call, control, gateFor, randomHex, shardAt, shardFor } from "./helpers.js";

const SHARDS = Number(env.SHARDS);

async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

function base32(bytes) {
  const alphabet = "abcdefghijklmnopqrstuvwxyz234567";
  let bits = 0;
  let acc = 0;
  let out = "";
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

// CIDv1 raw sha2-256 ("bafkrei…"), written here independently of src/r2.js.
async function rawCid(bytes) {
  return "b" + base32([1, 0x55, 0x12, 0x20, ...(await sha256(bytes))]);
}

function base58(bytes) {
  const alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
  let n = 0n;
  for (const b of bytes) n = n * 256n + BigInt(b);
  let out = "";
  while (n > 0n) {
    out = alphabet[Number(n % 58n)] + out;
    n /= 58n;
  }
  return out;
}

function bytesB64(bytes) {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
}

function pattern(n, seed) {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (i * 31 + seed) & 0xff;
  return out;
}

async function rowOf(id, columns) {
  return runInDurableObject(shardFor(id).stub, (i) => i.sql.exec(`SELECT ${columns} FROM tasks WHERE id = ?`, id).toArray()[0]);
}

describe("task shards", () => {
  it("tasks spread over the shards, and a lease by kind takes them from all shards, highest priority first", async () => {
    const ids = [];
    for (let i = 0; i < 24; i++) {
      const r = await call("POST", "/v1/tasks", { kind: "sc.spread", params: { i }, priority: i % 5 }, { peer: `spread-${i}` });
      expect(r.status).toBe(202);
      ids.push(r.json.id);
    }
    const perShard = [];
    for (let s = 0; s < SHARDS; s++) {
      perShard.push(await runInDurableObject(shardAt(s), (i) => i.sql.exec("SELECT COUNT(*) AS n FROM tasks WHERE kind = 'sc.spread'").toArray()[0].n));
    }
    expect(perShard.reduce((a, b) => a + b, 0)).toBe(24);
    expect(perShard.filter((n) => n > 0).length).toBeGreaterThan(1);
    // each task is in the shard its id hashes to
    for (const id of ids) expect((await rowOf(id, "id")).id).toBe(id);
    const leased = await call("POST", "/v1/lease", { kinds: ["sc.spread"], max: 100 }, { peer: "spread-puller" });
    expect(leased.json.tasks.length).toBe(24);
    const priorities = leased.json.tasks.map((t) => t.priority);
    expect(priorities).toEqual([...priorities].sort((a, b) => b - a));
    expect(new Set(leased.json.tasks.map((t) => t.id))).toEqual(new Set(ids));
  });

  it("the directory names a shard for a kind only while it holds queued tasks of it", async () => {
    const hints = () =>
      runInDurableObject(control(), (i) =>
        i.sql.exec("SELECT shard, has FROM hints WHERE kind = 'sc.dir' ORDER BY shard").toArray().map((r) => [r.shard, r.has]),
      );
    const ids = [];
    for (let i = 0; i < 8; i++) {
      ids.push((await call("POST", "/v1/tasks", { kind: "sc.dir", params: { i } }, { peer: "dir-sub" })).json.id);
    }
    const holding = [...new Set(ids.map((id) => shardFor(id).index))].sort();
    expect((await hints()).filter(([, has]) => has).map(([s]) => s)).toEqual(holding);
    const leased = await call("POST", "/v1/lease", { kinds: ["sc.dir"], max: 100 }, { peer: "dir-puller" });
    expect(leased.json.tasks.length).toBe(8);
    expect((await hints()).filter(([, has]) => has)).toEqual([]);
    // and a shard that gets one again says so
    const again = await call("POST", "/v1/tasks", { kind: "sc.dir", params: { i: 99 } }, { peer: "dir-sub" });
    expect((await hints()).filter(([, has]) => has).map(([s]) => s)).toEqual([shardFor(again.json.id).index]);
  });

  it("nonces and the rate limit live in the peer's gate, not in a task shard", async () => {
    const nonce = randomHex();
    const r = await call("GET", "/v1/tasks?limit=1", undefined, { peer: "gate-owner", signOpts: { nonce } });
    expect(r.status).toBe(200);
    const inGate = await runInDurableObject(gateFor("gate-owner"), (i) => i.sql.exec("SELECT COUNT(*) AS n FROM seen_nonces WHERE nonce = ?", nonce).toArray()[0].n);
    expect(inGate).toBe(1);
    for (let s = 0; s < SHARDS; s++) {
      const tables = await runInDurableObject(shardAt(s), (i) =>
        i.sql.exec("SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('seen_nonces', 'buckets')").toArray(),
      );
      expect(tables).toEqual([]);
    }
    // another peer's gate knows nothing of it
    const other = await runInDurableObject(gateFor("gate-other"), (i) => i.sql.exec("SELECT COUNT(*) AS n FROM seen_nonces").toArray()[0].n);
    expect(other).toBe(0);
  });

  it("a portable run writes only its own row, in its own shard; a cache hit writes none", async () => {
    const body = { kind: "hash.sha256", input_b64: btoa("shard me " + randomHex()), params: {} };
    const a = await call("POST", "/v1/tasks", body, { peer: "portable" });
    expect(a.json.state).toBe("done");
    const b = await call("POST", "/v1/tasks", body, { peer: "portable" });
    expect(b.json.cached).toBe(true);
    const found = [];
    for (let s = 0; s < SHARDS; s++) {
      const n = await runInDurableObject(shardAt(s), (i) =>
        i.sql.exec("SELECT COUNT(*) AS n FROM tasks WHERE id IN (?, ?)", a.json.id, b.json.id).toArray()[0].n,
      );
      if (n) found.push([s, n]);
    }
    expect(found).toEqual([[shardFor(a.json.id).index, 1]]);
  });
});

describe("large inputs and outputs live in R2 by CID", () => {
  it("a queued input over 64 KiB is stored under ipfs/<raw CID>, not in the row", async () => {
    const input = pattern(200 * 1024, 7);
    const cid = await rawCid(input);
    const r = await call("POST", "/v1/tasks", { kind: "sc.bigin", params: {}, input_b64: bytesB64(input) }, { peer: "r2-in" });
    expect(r.status).toBe(202);
    const row = await rowOf(r.json.id, "input, input_key, input_size");
    expect(row).toEqual({ input: null, input_key: cid, input_size: input.length });
    const obj = await env.MIRROR.get(`ipfs/${cid}`);
    expect(new Uint8Array(await obj.arrayBuffer())).toEqual(input);
    const leased = await call("POST", "/v1/lease", { kinds: ["sc.bigin"] }, { peer: "r2-puller" });
    expect(leased.json.tasks.map((t) => t.input_b64)).toEqual([bytesB64(input)]);
  });

  it("a small queued input stays inline in its row", async () => {
    const r = await call("POST", "/v1/tasks", { kind: "sc.smallin", params: {}, input_b64: btoa("tiny") }, { peer: "r2-in" });
    const row = await rowOf(r.json.id, "input, input_key");
    expect(row.input_key).toBe(null);
    expect(new TextDecoder().decode(row.input)).toBe("tiny");
  });

  it("an output over 64 KiB is stored under ipfs/<raw CID>, and answers carry it whole", async () => {
    const r = await call("POST", "/v1/tasks", { kind: "sc.bigout", params: {} }, { peer: "r2-out" });
    await call("POST", "/v1/lease", { kinds: ["sc.bigout"] }, { peer: "r2-out-worker" });
    const output = "ü".repeat(50 * 1024); // 100 KiB of UTF-8
    const done = await call("POST", `/v1/tasks/${r.json.id}/result`, { ok: true, output }, { peer: "r2-out-worker" });
    expect(done.json.output).toBe(output);
    const text = JSON.stringify(output);
    const cid = await rawCid(new TextEncoder().encode(text));
    expect(await rowOf(r.json.id, "output, output_cid, output_size")).toEqual({ output: null, output_cid: cid, output_size: new TextEncoder().encode(text).length });
    expect(await (await env.MIRROR.get(`ipfs/${cid}`)).text()).toBe(text);
    const got = await call("GET", `/v1/tasks/${r.json.id}`, undefined, { peer: "r2-out" });
    expect(got.json.output).toBe(output);
    const listed = await call("GET", "/v1/tasks?kind=sc.bigout", undefined, { peer: "r2-out" });
    expect(listed.json.tasks.map((t) => t.output)).toEqual([output]);
  });

  it("a large output from a peer without the lease is refused and never written to R2", async () => {
    const r = await call("POST", "/v1/tasks", { kind: "sc.forge", params: {} }, { peer: "r2-forge" });
    await call("POST", "/v1/lease", { kinds: ["sc.forge"] }, { peer: "r2-holder" });
    const output = "forged " + "x".repeat(100 * 1024) + randomHex();
    const forged = await call("POST", `/v1/tasks/${r.json.id}/result`, { ok: true, output }, { peer: "r2-forger" });
    expect(forged.status).toBe(403);
    const cid = await rawCid(new TextEncoder().encode(JSON.stringify(output)));
    expect(await env.MIRROR.head(`ipfs/${cid}`)).toBe(null);
    const never = await call("POST", "/v1/tasks", { kind: "sc.forge", params: { other: 1 } }, { peer: "r2-forge" });
    const unleased = await call("POST", `/v1/tasks/${never.json.id}/result`, { ok: true, output }, { peer: "r2-forger" });
    expect(unleased.status).toBe(409);
    expect(await env.MIRROR.head(`ipfs/${cid}`)).toBe(null);
  });

  it("an edge run's large output goes to R2 too", async () => {
    const input = new TextEncoder().encode(Array.from({ length: 30000 }, (_, i) => `w${i}`).join(" "));
    const r = await call("POST", "/v1/tasks", { kind: "base64.encode", params: {}, input_b64: bytesB64(input), no_cache: true }, { peer: "r2-edge" });
    expect(r.json.state).toBe("done");
    expect(atob(r.json.output)).toBe(new TextDecoder().decode(input));
    const row = await rowOf(r.json.id, "output, output_cid");
    expect(row.output).toBe(null);
    expect(row.output_cid).toMatch(/^bafkrei/);
    expect((await call("GET", `/v1/tasks/${r.json.id}`, undefined, { peer: "r2-edge" })).json.output).toBe(r.json.output);
  });

  it("input_cid is read from the mirror's layout: ipfs/<CIDv1>, a CIDv0 under its CIDv1", async () => {
    const data = new TextEncoder().encode("mirror file " + randomHex());
    const cid = await rawCid(data);
    await env.MIRROR.put(`ipfs/${cid}`, data);
    const r = await call("POST", "/v1/tasks", { kind: "hash.sha256", params: {}, input_cid: cid, no_cache: true }, { peer: "mirror" });
    expect(r.status).toBe(200);
    expect(r.json.state).toBe("done");
    expect(r.json.output).toBe([...(await sha256(data))].map((b) => b.toString(16).padStart(2, "0")).join(""));
    // CIDv0 "Qm…" names a dag-pb node; the mirror keys it as CIDv1 dag-pb ("bafybei…")
    const mh = [0x12, 0x20, ...(await sha256(new TextEncoder().encode("a dag-pb node " + randomHex())))];
    const v0 = base58(mh);
    const v1 = "b" + base32([1, 0x70, ...mh]);
    await env.MIRROR.put(`ipfs/${v1}`, "one two three");
    const t = await call("POST", "/v1/tasks", { kind: "text.stats", params: {}, input_cid: v0, no_cache: true }, { peer: "mirror" });
    expect(t.json.state).toBe("done");
    expect(t.json.output.words).toBe(3);
  });
});
