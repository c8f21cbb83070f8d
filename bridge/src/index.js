// teammesh Cloudflare bridge: the Worker entry point and router.
//
//   GET  /health                      unauthenticated liveness + bindings
//   POST /v1/tasks                    run a portable kind now, or queue for pull-mode peers
//   GET  /v1/tasks?state=&kind=&limit list tasks
//   GET  /v1/tasks/{id}               one task
//   POST /v1/tasks/{id}/result        complete a leased task (pull mode)
//   POST /v1/lease                    lease queued tasks (pull mode)
//   POST /v1/cache/invalidate         drop cached results by key prefix
//
// Every /v1 request is HMAC-signed with the team bridge key (see src/auth.js); errors
// are JSON {"error": {"code", "message"}}. docs/BRIDGE.md is the reference.

import { authenticate, HttpError } from "./auth.js";
import { bytesToBase64, F64, orderedObject, parseJSON, Raw, sortedJSON, stringify } from "./json.js";
import { KINDS, portableNames, runKind, whyNotPortable } from "./kinds/index.js";
import { validateParams } from "./kinds/params.js";
import { fromHex, hex, sha256Hex } from "./util.js";

export { TaskQueue } from "./queue.js";

const MAX_INLINE_INPUT = 4 * 1024 * 1024;
const DRAIN_LIMIT = 64 * 1024 * 1024;
const WHERE = ["any", "local", "peers", "bridge"];
const ID_RE = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;

function intVar(env, name, dflt) {
  const v = Number(env[name]);
  return Number.isFinite(v) && v > 0 ? v : dflt;
}

function limits(env) {
  return {
    maxBody: intVar(env, "MAX_BODY_BYTES", 10 * 1024 * 1024),
    rate: intVar(env, "RATE_PER_S", 50),
    burst: intVar(env, "RATE_BURST", 100),
    cacheTtl: Math.max(60, intVar(env, "CACHE_TTL_S", 86400)),
    maxSamples: intVar(env, "MAX_MC_SAMPLES", 50000000),
    skew: intVar(env, "MAX_SKEW_S", 300),
  };
}

function corsHeaders(env, request) {
  const allowed = (env.ALLOW_ORIGIN ?? "*").trim();
  if (!allowed) return {};
  const origin = request.headers.get("Origin");
  let value = null;
  if (allowed === "*") value = "*";
  else if (origin && allowed.split(",").map((s) => s.trim()).includes(origin)) value = origin;
  if (!value) return { Vary: "Origin" };
  return {
    "Access-Control-Allow-Origin": value,
    "Access-Control-Expose-Headers": "Retry-After",
    Vary: "Origin",
  };
}

function jsonResponse(status, body, extra = {}) {
  const text = typeof body === "string" ? body : stringify(body);
  return new Response(text, {
    status,
    headers: { "Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store", ...extra },
  });
}

function errorResponse(status, code, message, extra = {}) {
  return jsonResponse(status, { error: { code, message } }, extra);
}

function queueStub(env) {
  return env.QUEUE.get(env.QUEUE.idFromName("teammesh-bridge-v1"));
}

function newTaskId() {
  const ms = Date.now().toString(16).padStart(11, "0");
  const rnd = hex(crypto.getRandomValues(new Uint8Array(6)));
  return ms + rnd;
}

// Task JSON as node/tasks.py TaskRecord.to_json writes it.
function taskJson(t) {
  if (!t) return null;
  const attempts = JSON.parse(t.attempts || "[]");
  const out = orderedObject();
  out.id = t.id;
  out.kind = t.kind;
  out.version = t.version;
  out.state = t.state;
  out.executed_by = t.executed_by ?? null;
  out.output = t.output === null || t.output === undefined ? null : new Raw(t.output);
  out.error = t.error ?? null;
  out.waiting_reason = t.waiting_reason ?? null;
  out.attempts = attempts.map((a) => ({
    peer: a.peer,
    started: a.started === null ? null : new F64(a.started),
    ended: a.ended === null ? null : new F64(a.ended),
    error: a.error ?? null,
  }));
  out.priority = t.priority;
  out.where = "bridge";
  out.replicas = 1;
  out.tag = t.tag === null || t.tag === undefined ? null : new Raw(t.tag);
  out.cached = !!t.cached;
  out.timings = {
    submitted: new F64(t.submitted),
    started: t.started === null || t.started === undefined ? null : new F64(t.started),
    finished: t.finished === null || t.finished === undefined ? null : new F64(t.finished),
  };
  out.submitter = t.submitter ?? null;
  if (t.state === "running") out.lease = { peer: t.lease_peer, until: new F64(t.lease_until) };
  if (t.signature) out.signature = t.signature;
  return out;
}

async function readBody(request, max) {
  const cl = request.headers.get("Content-Length");
  if (cl !== null && /^\d+$/.test(cl) && Number(cl) > max) {
    throw new HttpError(413, "payload_too_large", `request body is ${cl} bytes; the limit is ${max} bytes`);
  }
  if (!request.body) return new Uint8Array(0);
  const reader = request.body.getReader();
  const chunks = [];
  let total = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    total += value.length;
    if (total > max) {
      // Drain (bounded) rather than cancel: a cancelled chunked upload leaves the
      // client's keep-alive connection unusable behind wrangler's dev proxy.
      let drained = total;
      while (drained < DRAIN_LIMIT) {
        const next = await reader.read();
        if (next.done) break;
        drained += next.value.length;
      }
      if (drained >= DRAIN_LIMIT) await reader.cancel().catch(() => {});
      throw new HttpError(413, "payload_too_large", `request body exceeds the limit of ${max} bytes`, {
        Connection: "close",
      });
    }
    chunks.push(value);
  }
  const out = new Uint8Array(total);
  let off = 0;
  for (const c of chunks) {
    out.set(c, off);
    off += c.length;
  }
  return out;
}

function parseBody(bytes) {
  if (!bytes.length) throw new HttpError(400, "bad_json", "request body must be a JSON object");
  let text;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw new HttpError(400, "bad_json", "request body is not valid UTF-8");
  }
  let value;
  try {
    value = parseJSON(text, { ordered: true, lossless: true });
  } catch (e) {
    throw new HttpError(400, "bad_json", `request body is not valid JSON: ${e.message}`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new HttpError(400, "bad_json", "request body must be a JSON object");
  }
  return value;
}

function badRequest(message) {
  return new HttpError(400, "invalid_task", message);
}

function num(v) {
  return v instanceof F64 ? v.v : typeof v === "bigint" ? Number(v) : v;
}

function decodeB64(text) {
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(text) || text.length % 4) return null;
  try {
    const bin = atob(text);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  } catch {
    return null;
  }
}

async function cacheKey(kind, version, params, input) {
  const h = await sha256Hex(`${kind}\n${version}\n${sortedJSON(params)}\n${await sha256Hex(input)}`);
  return `cache/${kind}/${version}/${h}`;
}

// CIDv1 raw + sha2-256 ("bafkrei..."): the digest can be checked against the bytes.
const B32 = "abcdefghijklmnopqrstuvwxyz234567";
function rawSha256Digest(cid) {
  if (!cid.startsWith("b")) return null;
  let bits = 0;
  let acc = 0;
  const bytes = [];
  for (const ch of cid.slice(1)) {
    const v = B32.indexOf(ch);
    if (v < 0) return null;
    acc = (acc << 5) | v;
    bits += 5;
    if (bits >= 8) {
      bits -= 8;
      bytes.push((acc >> bits) & 0xff);
    }
  }
  if (bytes.length === 36 && bytes[0] === 1 && bytes[1] === 0x55 && bytes[2] === 0x12 && bytes[3] === 0x20) {
    return hex(new Uint8Array(bytes.slice(4)));
  }
  return null;
}

async function loadCid(env, cid) {
  if (!env.MIRROR) throw new HttpError(422, "no_mirror", "input_cid needs the R2 MIRROR binding");
  if (typeof cid !== "string" || !/^[A-Za-z0-9]{8,128}$/.test(cid)) throw badRequest("'input_cid' must be a CID string");
  const key = (env.MIRROR_PREFIX ?? "blocks/") + cid;
  const obj = await env.MIRROR.get(key);
  if (!obj) throw new HttpError(422, "cid_not_found", `input_cid ${cid} is not in the R2 mirror (key ${key})`);
  if (obj.size > MAX_INLINE_INPUT) {
    throw new HttpError(413, "input_too_large", `input ${cid} is ${obj.size} bytes; the bridge runs inputs up to ${MAX_INLINE_INPUT} bytes`);
  }
  const data = new Uint8Array(await obj.arrayBuffer());
  const want = rawSha256Digest(cid);
  if (want && (await sha256Hex(data)) !== want) {
    throw new HttpError(422, "cid_mismatch", `the mirror's object for ${cid} does not match its digest`);
  }
  return data;
}

async function submitTask(request, env, ctx, peer, body) {
  const lim = limits(env);
  const kind = body.kind;
  if (typeof kind !== "string" || !kind) throw badRequest("'kind' (string) is required");
  let id = body.id;
  if (id === undefined || id === null) id = newTaskId();
  else if (typeof id !== "string" || !ID_RE.test(id)) throw badRequest("'id' must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}");
  let input = new Uint8Array(0);
  if (body.input_b64 !== undefined && body.input_b64 !== null) {
    if (typeof body.input_b64 !== "string") throw badRequest("'input_b64' must be a base64 string");
    input = decodeB64(body.input_b64);
    if (input === null) throw badRequest("'input_b64' is not valid base64");
    if (body.input_cid !== undefined && body.input_cid !== null) throw badRequest("give 'input_b64' or 'input_cid', not both");
  }
  if (input.length > MAX_INLINE_INPUT) {
    throw new HttpError(413, "input_too_large", `input is ${input.length} bytes; inline inputs are limited to ${MAX_INLINE_INPUT} bytes (share larger files by CID)`);
  }
  const params = body.params ?? {};
  if (params === null || typeof params !== "object" || Array.isArray(params) || params instanceof F64) {
    throw badRequest("'params' must be an object");
  }
  const priority = num(body.priority ?? 0);
  if (!Number.isInteger(priority) || body.priority instanceof F64) throw badRequest("'priority' must be an integer");
  if (body.where !== undefined && !WHERE.includes(body.where)) throw badRequest(`'where' must be one of ${WHERE.join(", ")}`);
  const submitter = body.submitter ?? peer;
  if (typeof submitter !== "string") throw badRequest("'submitter' must be a string");
  const version = body.version === undefined || body.version === null ? (KINDS[kind] ? KINDS[kind].version : "1") : String(body.version);
  const queueAllowed = body.queue !== false;
  const noCache = body.no_cache === true;
  const stub = queueStub(env);
  const now = Date.now() / 1000;
  const base = {
    id,
    kind,
    version,
    params: stringify(params),
    priority,
    submitter,
    tag: body.tag === undefined ? null : stringify(body.tag),
    input_cid: body.input_cid ?? null,
    submitted: now,
  };

  // An id the bridge has seen returns the stored task (idempotent retries).
  const existing = body.id === undefined || body.id === null ? null : await stub.get(id);
  if (existing) {
    if (existing.kind !== kind) throw new HttpError(409, "id_conflict", `task ${id} exists with kind '${existing.kind}'`);
    return jsonResponse(200, taskJson(existing));
  }

  const reason = whyNotPortable(kind, version, params, lim);
  if (reason && !queueAllowed) {
    throw new HttpError(422, "not_portable", `${reason}; the request says "queue": false, so it is not held for pull-mode peers`);
  }
  if (body.input_cid !== undefined && body.input_cid !== null && !reason) input = await loadCid(env, body.input_cid);

  const key = await cacheKey(kind, version, params, input);
  if (!noCache && env.CACHE) {
    const hit = await env.CACHE.get(key);
    if (hit !== null) {
      const { task } = await stub.put(
        { ...base, state: "done", executed_by: "bridge", output: hit, cached: true, started: now, finished: now },
        null,
      );
      return jsonResponse(200, taskJson(task));
    }
  }

  if (reason) {
    const { task } = await stub.put(
      { ...base, state: "queued", cache_key: noCache ? null : key, waiting_reason: `${reason}; waiting for a pull-mode peer` },
      input,
    );
    return jsonResponse(202, taskJson(task));
  }

  const started = Date.now() / 1000;
  const result = await runKind(kind, input, params, validateParams);
  const finished = Date.now() / 1000;
  const outputText = result.ok ? stringify(result.output) : null;
  const attempts = JSON.stringify([{ peer: "bridge", started, ended: finished, error: result.ok ? null : result.error }]);
  const { task } = await stub.put(
    {
      ...base,
      state: result.ok ? "done" : "failed",
      executed_by: "bridge",
      output: outputText,
      error: result.ok ? null : result.error,
      attempts,
      started,
      finished,
    },
    null,
  );
  if (result.ok && !noCache && env.CACHE && outputText.length < 20 * 1024 * 1024) {
    ctx.waitUntil(env.CACHE.put(key, outputText, { expirationTtl: lim.cacheTtl }).catch(() => {}));
  }
  return jsonResponse(200, taskJson(task));
}

function parseKinds(v) {
  if (Array.isArray(v)) {
    const out = {};
    for (const k of v) {
      if (typeof k !== "string" || !k) throw badRequest("'kinds' must be a list of kind names or a {name: version} map");
      const at = k.indexOf("@");
      if (at > 0) out[k.slice(0, at)] = k.slice(at + 1);
      else out[k] = null;
    }
    return out;
  }
  if (v && typeof v === "object") {
    const out = {};
    for (const k of Object.keys(v)) out[k] = v[k] === null ? null : String(num(v[k]));
    return out;
  }
  throw badRequest("'kinds' must be a list of kind names or a {name: version} map");
}

async function lease(env, peer, body) {
  const kinds = parseKinds(body.kinds);
  const max = num(body.max ?? 1);
  const leaseS = num(body.lease_s ?? 60);
  if (!Number.isInteger(max) || max < 1 || max > 100) throw badRequest("'max' must be an integer from 1 to 100");
  if (typeof leaseS !== "number" || !(leaseS >= 1 && leaseS <= 3600)) throw badRequest("'lease_s' must be a number from 1 to 3600");
  const leased = await queueStub(env).lease(peer, kinds, max, leaseS);
  return jsonResponse(200, {
    tasks: leased.map(({ task, input, leaseUntil }) => {
      const o = orderedObject();
      o.id = task.id;
      o.kind = task.kind;
      o.version = task.version;
      o.input_b64 = bytesToBase64(input);
      o.input_cid = task.input_cid ?? null;
      o.params = new Raw(task.params);
      o.priority = task.priority;
      o.submitter = task.submitter ?? null;
      o.lease_until = new F64(leaseUntil);
      return o;
    }),
  });
}

async function completeTask(env, ctx, peer, id, body) {
  const ok = body.ok;
  if (typeof ok !== "boolean") throw badRequest("'ok' (boolean) is required");
  const error = body.error ?? null;
  if (!ok && (typeof error !== "string" || !error)) throw badRequest("'error' (string) is required when ok is false");
  const executor = body.executor ?? peer;
  if (typeof executor !== "string" || !executor) throw badRequest("'executor' must be a peer id string");
  if (body.signature !== undefined && body.signature !== null && typeof body.signature !== "string") {
    throw badRequest("'signature' must be a string");
  }
  // The output is stored exactly as sent (floats stay floats: the parser kept them).
  const outputText = ok ? stringify(body.output === undefined ? null : body.output) : null;
  const res = await queueStub(env).complete(id, peer, {
    ok,
    outputText,
    error: ok ? null : String(error).slice(0, 2000),
    executor,
    signature: body.signature ?? null,
  });
  if (res.status === "missing") throw new HttpError(404, "not_found", `no task ${id}`);
  if (res.status === "finished") {
    return errorResponse(409, "already_finished", `task ${id} is already ${res.task.state}`);
  }
  if (ok && res.cacheKey && env.CACHE && outputText.length < 20 * 1024 * 1024) {
    ctx.waitUntil(env.CACHE.put(res.cacheKey, outputText, { expirationTtl: limits(env).cacheTtl }).catch(() => {}));
  }
  return jsonResponse(200, taskJson(res.task));
}

async function invalidate(env, body) {
  const prefix = body.prefix ?? "";
  if (typeof prefix !== "string") throw badRequest("'prefix' must be a string (a kind name, 'kind/version', or '')");
  if (!env.CACHE) throw new HttpError(503, "no_cache", "the CACHE KV binding is missing");
  let deleted = 0;
  let cursor;
  let more = false;
  for (let page = 0; page < 10; page++) {
    const res = await env.CACHE.list({ prefix: "cache/" + prefix, cursor, limit: 1000 });
    await Promise.all(res.keys.map((k) => env.CACHE.delete(k.name)));
    deleted += res.keys.length;
    if (res.list_complete) {
      more = false;
      break;
    }
    more = true;
    cursor = res.cursor;
  }
  return jsonResponse(200, { deleted, more });
}

async function handleV1(request, env, ctx, url) {
  const lim = limits(env);
  const body = await readBody(request, lim.maxBody);
  const peer = await authenticate(request, env, url, body, lim);
  const admit = await queueStub(env).admit(peer, request.headers.get("X-Teammesh-Nonce").toLowerCase(), lim.rate, lim.burst);
  if (!admit.ok) {
    if (admit.code === "rate_limited") {
      throw new HttpError(429, "rate_limited", `peer ${peer} exceeded ${lim.rate} requests/s (burst ${lim.burst})`, {
        "Retry-After": String(admit.retryAfter),
      });
    }
    throw new HttpError(401, "replayed_nonce", "this nonce was already used; sign every request with a fresh nonce");
  }
  const path = url.pathname;
  const method = request.method;
  const segments = path.split("/").filter(Boolean); // ["v1", ...]
  const json = () => parseBody(body);

  if (segments[1] === "tasks" && segments.length === 2) {
    if (method === "POST") return submitTask(request, env, ctx, peer, json());
    if (method === "GET") {
      const state = url.searchParams.get("state");
      const kind = url.searchParams.get("kind");
      const limit = Number(url.searchParams.get("limit") ?? 100);
      if (state && !["queued", "running", "done", "failed", "cancelled"].includes(state)) {
        throw badRequest("'state' must be one of queued, running, done, failed, cancelled");
      }
      if (!Number.isInteger(limit) || limit < 1 || limit > 1000) throw badRequest("'limit' must be an integer from 1 to 1000");
      const rows = await queueStub(env).list(state, kind, limit);
      return jsonResponse(200, { tasks: rows.map(taskJson) });
    }
    throw new HttpError(405, "method_not_allowed", `${method} is not allowed on ${path}`);
  }
  if (segments[1] === "tasks" && segments.length === 3) {
    if (method !== "GET") throw new HttpError(405, "method_not_allowed", `${method} is not allowed on ${path}`);
    const task = await queueStub(env).get(decodeURIComponent(segments[2]));
    if (!task) throw new HttpError(404, "not_found", `no task ${segments[2]}`);
    return jsonResponse(200, taskJson(task));
  }
  if (segments[1] === "tasks" && segments.length === 4 && segments[3] === "result") {
    if (method !== "POST") throw new HttpError(405, "method_not_allowed", `${method} is not allowed on ${path}`);
    return completeTask(env, ctx, peer, decodeURIComponent(segments[2]), json());
  }
  if (path === "/v1/lease") {
    if (method !== "POST") throw new HttpError(405, "method_not_allowed", `${method} is not allowed on ${path}`);
    return lease(env, peer, json());
  }
  if (path === "/v1/cache/invalidate") {
    if (method !== "POST") throw new HttpError(405, "method_not_allowed", `${method} is not allowed on ${path}`);
    return invalidate(env, json());
  }
  throw new HttpError(404, "not_found", `no route ${method} ${path}`);
}

async function health(env) {
  return jsonResponse(200, {
    ok: true,
    version: env.VERSION ?? "dev",
    bindings: { queue: !!env.QUEUE, cache: !!env.CACHE, mirror: !!env.MIRROR },
    key_configured: !!(env.BRIDGE_KEY && fromHex(env.BRIDGE_KEY.trim())),
    portable_kinds: portableNames(),
  });
}

export default {
  async fetch(request, env, ctx) {
    const url = new URL(request.url);
    const cors = corsHeaders(env, request);
    let response;
    try {
      if (request.method === "OPTIONS") {
        response = new Response(null, {
          status: 204,
          headers: {
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers":
              "Content-Type, X-Teammesh-Peer, X-Teammesh-Timestamp, X-Teammesh-Nonce, X-Teammesh-Signature",
            "Access-Control-Max-Age": "600",
          },
        });
      } else if (url.pathname === "/health") {
        if (request.method !== "GET" && request.method !== "HEAD") {
          throw new HttpError(405, "method_not_allowed", `${request.method} is not allowed on /health`);
        }
        response = await health(env);
      } else if (url.pathname === "/v1" || url.pathname.startsWith("/v1/")) {
        response = await handleV1(request, env, ctx, url);
      } else {
        throw new HttpError(404, "not_found", `no route ${request.method} ${url.pathname}`);
      }
    } catch (e) {
      if (e instanceof HttpError) response = errorResponse(e.status, e.code, e.message, e.headers);
      else {
        console.error("bridge error", e && e.stack ? e.stack : e);
        response = errorResponse(500, "internal", `internal error: ${e && e.message ? e.message : e}`);
      }
    }
    for (const [k, v] of Object.entries(cors)) response.headers.set(k, v);
    return response;
  },
};

