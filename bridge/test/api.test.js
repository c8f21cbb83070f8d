import { createExecutionContext, env, runDurableObjectAlarm, runInDurableObject, SELF, waitOnExecutionContext } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import worker from "../src/index.js";
import { b64, call, control, randomHex, shardFor, sign } from "./helpers.js";

describe("routes", () => {
  it("GET /health reports bindings without auth", async () => {
    const res = await SELF.fetch("https://bridge.test/health");
    const body = await res.json();
    expect(res.status).toBe(200);
    expect(body.ok).toBe(true);
    expect(body.version).toBe("0.1.0");
    expect(body.bindings).toEqual({ queue: true, cache: true, mirror: true });
    expect(body.objects).toEqual({ shards: 4, gate: true, control: true });
    expect(body.key_configured).toBe(true);
  });

  it("unknown routes and methods are JSON errors", async () => {
    let r = await call("GET", "/v1/nope", undefined, { peer: "routes" });
    expect(r.status).toBe(404);
    expect(r.json.error.code).toBe("not_found");
    r = await call("GET", "/v1/lease", undefined, { peer: "routes" });
    expect(r.status).toBe(405);
    const res = await SELF.fetch("https://bridge.test/elsewhere");
    expect(res.status).toBe(404);
    expect((await res.json()).error.code).toBe("not_found");
  });

  it("answers CORS preflights", async () => {
    const res = await SELF.fetch("https://bridge.test/v1/tasks", {
      method: "OPTIONS",
      headers: { Origin: "http://localhost:7070", "Access-Control-Request-Method": "POST" },
    });
    expect(res.status).toBe(204);
    expect(res.headers.get("Access-Control-Allow-Origin")).toBe("*");
    expect(res.headers.get("Access-Control-Allow-Headers")).toContain("X-Teammesh-Signature");
  });

  it("runs a portable kind at once", async () => {
    const r = await call("POST", "/v1/tasks", { kind: "hash.sha256", input_b64: b64("abc"), params: {}, no_cache: true }, { peer: "run" });
    expect(r.status).toBe(200);
    expect(r.json.state).toBe("done");
    expect(r.json.executed_by).toBe("bridge");
    expect(r.json.output).toBe("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    expect(Object.keys(r.json).slice(0, 7)).toEqual(["id", "kind", "version", "state", "executed_by", "output", "error"]);
    const again = await call("GET", `/v1/tasks/${r.json.id}`, undefined, { peer: "run" });
    expect(again.json.output).toBe(r.json.output);
  });

  it("reports a failed task for bad input", async () => {
    const r = await call("POST", "/v1/tasks", { kind: "base64.decode", input_b64: b64("ab!c"), params: {} }, { peer: "run" });
    expect(r.status).toBe(200);
    expect(r.json.state).toBe("failed");
    expect(r.json.error).toBe("base64.decode: invalid base64 character b'!' at offset 2");
  });

  it("validates the request", async () => {
    let r = await call("POST", "/v1/tasks", "{oops", { peer: "val" });
    expect(r.status).toBe(400);
    expect(r.json.error.code).toBe("bad_json");
    r = await call("POST", "/v1/tasks", { params: {} }, { peer: "val" });
    expect(r.status).toBe(400);
    r = await call("POST", "/v1/tasks", { kind: "hash.sha256", params: [] }, { peer: "val" });
    expect(r.status).toBe(400);
    r = await call("POST", "/v1/tasks", { kind: "hash.sha256", priority: 1.5 }, { peer: "val" });
    expect(r.status).toBe(400);
  });

  it("refuses non-portable kinds with queue false", async () => {
    const r = await call("POST", "/v1/tasks", { kind: "np.matmul", params: {}, queue: false }, { peer: "q" });
    expect(r.status).toBe(422);
    expect(r.json.error.code).toBe("not_portable");
    expect(r.json.error.message).toContain("np.matmul");
    const big = await call("POST", "/v1/tasks", { kind: "np.montecarlo_pi", params: { samples: 10000000 }, queue: false }, { peer: "q" });
    expect(big.status).toBe(422);
    expect(big.json.error.message).toContain("MAX_MC_SAMPLES");
  });
});

describe("auth", () => {
  it("rejects unsigned, wrongly signed, stale and replayed requests", async () => {
    let r = await call("GET", "/v1/tasks", undefined, { sign: false, peer: "auth" });
    expect(r.status).toBe(401);
    expect(r.json.error.code).toBe("missing_signature");
    r = await call("GET", "/v1/tasks", undefined, { signOpts: { keyHex: "00".repeat(32) }, peer: "auth" });
    expect(r.status).toBe(401);
    expect(r.json.error.code).toBe("bad_signature");
    r = await call("GET", "/v1/tasks", undefined, { signOpts: { ts: String(Math.floor(Date.now() / 1000) - 301) }, peer: "auth" });
    expect(r.status).toBe(401);
    expect(r.json.error.code).toBe("stale_timestamp");
    const nonce = randomHex();
    r = await call("GET", "/v1/tasks?limit=1", undefined, { signOpts: { nonce }, peer: "auth" });
    expect(r.status).toBe(200);
    r = await call("GET", "/v1/tasks?limit=1", undefined, { signOpts: { nonce }, peer: "auth" });
    expect(r.status).toBe(401);
    expect(r.json.error.code).toBe("replayed_nonce");
  });

  it("signs the body: a changed body fails", async () => {
    const headers = await sign({ method: "POST", path: "/v1/tasks", body: '{"kind":"a"}', peer: "auth2" });
    const res = await SELF.fetch("https://bridge.test/v1/tasks", { method: "POST", headers, body: '{"kind":"b"}' });
    expect(res.status).toBe(401);
    expect((await res.json()).error.code).toBe("bad_content_hash");
  });

  it("413 on a declared oversize body, before reading it", async () => {
    expect.assertions(3);
    const headers = {
      ...(await sign({ method: "POST", path: "/v1/tasks", peer: "big", bodyHash: "00".repeat(32) })),
      "Content-Length": String(50 * 1024 * 1024),
    };
    // 1 MiB per pull, up to the declared 50 MiB: reading the body would pull it
    let pulled = 0;
    const body = new ReadableStream({
      pull(c) {
        pulled++;
        if (pulled > 50) c.close();
        else c.enqueue(new Uint8Array(1024 * 1024));
      },
    });
    const res = await SELF.fetch("https://bridge.test/v1/tasks", { method: "POST", headers, body, duplex: "half" });
    expect(res.status).toBe(413);
    expect((await res.json()).error.code).toBe("payload_too_large");
    // at most the stream's own first pull (and one in flight): the Worker read nothing
    expect(pulled).toBeLessThanOrEqual(2);
  });

  it("413 on an actual oversize body", async () => {
    const body = new Uint8Array(10 * 1024 * 1024 + 1);
    const headers = await sign({ method: "POST", path: "/v1/tasks", body, peer: "big2" });
    const res = await SELF.fetch("https://bridge.test/v1/tasks", { method: "POST", headers, body });
    expect(res.status).toBe(413);
    expect((await res.json()).error.code).toBe("payload_too_large");
  });

  it("rate-limits per peer (429 with Retry-After)", async () => {
    let limited = null;
    for (let i = 0; i < 40 && !limited; i++) {
      const r = await call("GET", "/v1/tasks?limit=1", undefined, { peer: "flood" });
      if (r.status === 429) limited = r;
    }
    expect(limited).not.toBeNull();
    expect(limited.json.error.code).toBe("rate_limited");
    expect(Number(limited.headers.get("Retry-After"))).toBeGreaterThanOrEqual(1);
    const other = await call("GET", "/v1/tasks?limit=1", undefined, { peer: "not-flood" });
    expect(other.status).toBe(200);
  });

  it("is not configured without BRIDGE_KEY: signed requests get 503 not_configured", async () => {
    expect.assertions(5);
    // no master stored by a rotation either (the rotation test removes its own)
    const stored = await runInDurableObject(control(), (i) => i.sql.exec("SELECT COUNT(*) AS n FROM masters").toArray()[0].n);
    expect(stored).toBe(0);
    const bare = { ...env, BRIDGE_KEY: undefined };
    const fetchBare = async (path, init) => {
      const ctx = createExecutionContext();
      const res = await worker.fetch(new Request("https://bridge.test" + path, init), bare, ctx);
      await waitOnExecutionContext(ctx);
      return res;
    };
    const headers = await sign({ method: "GET", path: "/v1/tasks?limit=1", peer: "nokey" });
    const res = await fetchBare("/v1/tasks?limit=1", { headers });
    expect(res.status).toBe(503);
    expect((await res.json()).error.code).toBe("not_configured");
    const health = await (await fetchBare("/health")).json();
    expect(health.key_configured).toBe(false);
    // the same request with the key configured is served
    const ok = await call("GET", "/v1/tasks?limit=1", undefined, { peer: "nokey" });
    expect(ok.status).toBe(200);
  });
});

describe("queue, lease, result", () => {
  it("queues non-portable kinds and leases highest priority first", async () => {
    const ids = [];
    for (const priority of [1, 7, 3]) {
      const r = await call("POST", "/v1/tasks", { kind: "vt.queue", params: { p: priority }, input_b64: b64("in"), priority }, { peer: "sub" });
      expect(r.status).toBe(202);
      expect(r.json.state).toBe("queued");
      ids.push(r.json.id);
    }
    const listed = await call("GET", "/v1/tasks?state=queued&kind=vt.queue", undefined, { peer: "sub" });
    expect(listed.json.tasks.map((t) => t.id)).toEqual([ids[1], ids[2], ids[0]]);
    const leased = await call("POST", "/v1/lease", { kinds: ["vt.queue"], max: 2, lease_s: 60 }, { peer: "puller" });
    expect(leased.json.tasks.map((t) => t.id)).toEqual([ids[1], ids[2]]);
    expect(atob(leased.json.tasks[0].input_b64)).toBe("in");
    expect(leased.json.tasks[0].params).toEqual({ p: 7 });
    // raw text: JSON.stringify would write 1.0 as 1
    const done = await call("POST", `/v1/tasks/${ids[1]}/result`, '{"ok": true, "output": {"x": 1.0}, "executor": "puller"}', { peer: "puller" });
    expect(done.status).toBe(200);
    expect(done.json.state).toBe("done");
    expect(done.text).toContain('"output":{"x":1.0}');
    const again = await call("POST", `/v1/tasks/${ids[1]}/result`, { ok: true, output: 2 }, { peer: "puller" });
    expect(again.status).toBe(409);
    const failed = await call("POST", `/v1/tasks/${ids[2]}/result`, { ok: false, error: "vt.queue: nope" }, { peer: "puller" });
    expect(failed.json.state).toBe("failed");
    expect(failed.json.error).toBe("vt.queue: nope");
  });

  it("expired leases return to the queue (alarm)", async () => {
    const r = await call("POST", "/v1/tasks", { kind: "vt.expire", params: {} }, { peer: "sub2" });
    const leased = await call("POST", "/v1/lease", { kinds: ["vt.expire"], lease_s: 30 }, { peer: "slow" });
    expect(leased.json.tasks.length).toBe(1);
    const { stub } = shardFor(r.json.id);
    await runInDurableObject(stub, async (instance) => {
      instance.sql.exec("UPDATE tasks SET lease_until = ? WHERE id = ?", Date.now() / 1000 - 1, r.json.id);
    });
    await runDurableObjectAlarm(stub);
    const back = await call("GET", `/v1/tasks/${r.json.id}`, undefined, { peer: "sub2" });
    expect(back.json.state).toBe("queued");
    expect(back.json.attempts.at(-1).error).toBe("lease expired");
    const again = await call("POST", "/v1/lease", { kinds: { "vt.expire": "1" } }, { peer: "fast" });
    expect(again.json.tasks.map((t) => t.id)).toEqual([r.json.id]);
  });

  it("validates lease requests", async () => {
    const r = await call("POST", "/v1/lease", { kinds: "vt", max: 0 }, { peer: "lv" });
    expect(r.status).toBe(400);
    const missing = await call("POST", "/v1/tasks/nope/result", { ok: true, output: 1 }, { peer: "lv" });
    expect(missing.status).toBe(404);
  });
});

describe("result cache", () => {
  it("serves repeats from KV and invalidates by prefix", async () => {
    const body = { kind: "text.stats", input_b64: b64("cache me please"), params: {} };
    const a = await call("POST", "/v1/tasks", body, { peer: "cache" });
    const b = await call("POST", "/v1/tasks", body, { peer: "cache" });
    expect(a.json.cached).toBe(false);
    expect(b.json.cached).toBe(true);
    expect(b.json.output).toEqual(a.json.output);
    // a cache hit writes nothing to the Durable Object
    const stored = await runInDurableObject(shardFor(b.json.id).stub, (instance) => instance.sql.exec("SELECT COUNT(*) AS n FROM tasks WHERE id = ?", b.json.id).toArray()[0].n);
    expect(stored).toBe(0);
    const inv = await call("POST", "/v1/cache/invalidate", { prefix: "text.stats/" }, { peer: "cache" });
    expect(inv.status).toBe(200);
    expect(inv.json).toEqual({ scope: "text.stats", generation: 1 });
    const c = await call("POST", "/v1/tasks", body, { peer: "cache" });
    expect(c.json.cached).toBe(false);
  });
});

describe("cancel", () => {
  it("its submitter cancels a queued task; another member may not; an admin may; a cancel is idempotent", async () => {
    const t = await call("POST", "/v1/tasks", { kind: "vt.cancel", params: {}, submitter: "canceller" }, { peer: "canceller" });
    expect(t.status).toBe(202);
    const other = await call("POST", `/v1/tasks/${t.json.id}/cancel`, {}, { peer: "someone-else" });
    expect(other.status).toBe(403);
    expect(other.json.error.code).toBe("not_submitter");
    const r = await call("POST", `/v1/tasks/${t.json.id}/cancel`, {}, { peer: "canceller" });
    expect(r.status).toBe(200);
    expect(r.json.state).toBe("cancelled");
    expect(r.json.error).toBe("cancelled by its submitter");
    // nothing left to lease, and a second cancel answers the same final state
    const leased = await call("POST", "/v1/lease", { kinds: ["vt.cancel"] }, { peer: "cancel-puller" });
    expect(leased.json.tasks).toEqual([]);
    const again = await call("POST", `/v1/tasks/${t.json.id}/cancel`, {}, { peer: "canceller" });
    expect([again.status, again.json.state]).toEqual([200, "cancelled"]);
    const byAdmin = await call("POST", "/v1/tasks", { kind: "vt.cancel", params: {}, submitter: "canceller" }, { peer: "canceller" });
    const a = await call("POST", `/v1/tasks/${byAdmin.json.id}/cancel`, {}, { peer: "an-admin", signOpts: { admin: true } });
    expect([a.status, a.json.state, a.json.error]).toEqual([200, "cancelled", "cancelled by an admin"]);
    const missing = await call("POST", "/v1/tasks/no-such-task/cancel", {}, { peer: "canceller" });
    expect(missing.status).toBe(404);
  });

  it("a leased task that is cancelled refuses its lease holder's result", async () => {
    const t = await call("POST", "/v1/tasks", { kind: "vt.cancel2", params: {}, submitter: "canceller2" }, { peer: "canceller2" });
    const leased = await call("POST", "/v1/lease", { kinds: ["vt.cancel2"] }, { peer: "cancel-puller2" });
    expect(leased.json.tasks.map((x) => x.id)).toEqual([t.json.id]);
    const r = await call("POST", `/v1/tasks/${t.json.id}/cancel`, {}, { peer: "canceller2" });
    expect(r.json.state).toBe("cancelled");
    expect(JSON.parse(JSON.stringify(r.json.attempts)).map((x) => x.error)).toEqual(["cancelled by its submitter"]);
    const late = await call("POST", `/v1/tasks/${t.json.id}/result`, { ok: true, output: 1 }, { peer: "cancel-puller2" });
    expect(late.status).toBe(409);
    expect(late.json.error.code).toBe("already_finished");
    expect((await call("GET", `/v1/tasks/${t.json.id}`, undefined, { peer: "canceller2" })).json.state).toBe("cancelled");
  });
});
