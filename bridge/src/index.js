// teammesh Cloudflare bridge: the Worker entry point and router.
//
//   GET  /health                      unauthenticated liveness + bindings
//   POST /v1/tasks                    run a portable kind now, or queue for pull-mode peers
//   GET  /v1/tasks?state=&kind=&limit list tasks
//   GET  /v1/tasks/{id}               one task
//   POST /v1/tasks/{id}/result        complete a leased task (pull mode)
//   POST /v1/lease                    lease queued tasks (pull mode)
//   POST /v1/cache/invalidate         drop cached results (a kind, a version, or all)
//   POST /v1/admin/rotate             admins: new master bridge key and epoch
//
// Every /v1 request is HMAC-signed with the member's key, derived from the team's master
// key, or with the master for admin requests (see src/auth.js); errors are JSON
// {"error": {"code", "message"}}. docs/BRIDGE.md is the reference.

import { HttpError, masterFromHex, parseAuth } from "./auth.js";
import { bytesToBase64, F64, orderedObject, parseJSON, Raw, sortedJSON, stringify } from "./json.js";
import { KINDS, portableNames, runKind, whyNotAtEdge, whyNotPortable } from "./kinds/index.js";
import { validateParams } from "./kinds/params.js";
import { hex, sha256Hex } from "./util.js";

export { TaskQueue } from "./queue.js";

const MAX_INLINE_INPUT = 4 * 1024 * 1024;
// Row discipline: a task row holds params, tag and at most 256 KiB of inline output, so
// it stays far below SQLite's 2 MB row limit in Durable Objects.
const MAX_PARAMS_BYTES = 512 * 1024;
const MAX_TAG_BYTES = 16 * 1024;
const MAX_NAME = 128;
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
    edgeInput: jsonVar(env, "EDGE_INPUT_BYTES"),
  };
}

function jsonVar(env, name) {
  const text = env[name];
  if (text === undefined || text === null || text === "") return {};
  try {
    const v = typeof text === "string" ? JSON.parse(text) : text;
    if (v && typeof v === "object" && !Array.isArray(v)) return v;
  } catch {
    /* reported below */
  }
  throw new HttpError(503, "not_configured", `the ${name} var must be a JSON object such as {"json.validate": 1048576}`);
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

function errorResponse(status, code, message, extra = {}, more = null) {
  // `more` (e.g. the key epoch of a stale_key answer) goes into the error object and,
  // with the code, at the top level, so a client finds it either way.
  const body = more ? { error: { code, message, ...more }, code, ...more } : { error: { code, message } };
  return jsonResponse(status, body, extra);
}

function queueStub(env) {
  return env.QUEUE.get(env.QUEUE.idFromName("teammesh-bridge-v1"));
}

function utf8Length(text) {
  return new TextEncoder().encode(text).length;
}

function decodePathSegment(segment) {
  try {
    return decodeURIComponent(segment);
  } catch {
    throw new HttpError(400, "bad_path", "the path has a malformed %-escape");
  }
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

function checkDeclaredLength(request, max) {
  const cl = request.headers.get("Content-Length");
  if (cl !== null && /^\d+$/.test(cl) && Number(cl) > max) {
    throw new HttpError(413, "payload_too_large", `request body is ${cl} bytes; the limit is ${max} bytes`);
  }
}

async function readBody(request, max) {
  checkDeclaredLength(request, max);
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

// The cache key covers the real input: its multihash. Inline bytes count as the sha2-256
// multihash of the bytes, so a raw sha2-256 CID and the same bytes inline share a key;
// any other CID counts as its own multihash. `gen` is the invalidation generation.
async function cacheKey(kind, version, params, inputMultihash, gen) {
  const h = await sha256Hex(`${kind}\n${version}\n${sortedJSON(params)}\n${inputMultihash}`);
  return `cache/${gen}/${kind}/${version}/${h}`;
}

async function bytesMultihash(bytes) {
  return "1220" + (await sha256Hex(bytes));
}

// The multihash (hex) inside a CID string: CIDv0 ("Qm…", base58btc) or CIDv1 in base32
// ("b…"). null if the string is not one.
const B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
function cidMultihash(cid) {
  if (cid.startsWith("Qm") && cid.length === 46) {
    let n = 0n;
    for (const ch of cid) {
      const v = B58.indexOf(ch);
      if (v < 0) return null;
      n = n * 58n + BigInt(v);
    }
    const out = [];
    while (n > 0n) {
      out.unshift(Number(n & 0xffn));
      n >>= 8n;
    }
    return out.length === 34 && out[0] === 0x12 && out[1] === 0x20 ? hex(new Uint8Array(out)) : null;
  }
  const bytes = base32Bytes(cid);
  if (!bytes) return null;
  let off = 0;
  const varint = () => {
    let v = 0;
    for (let shift = 0; shift < 28 && off < bytes.length; shift += 7) {
      const b = bytes[off++];
      v += (b & 0x7f) * 2 ** shift;
      if (!(b & 0x80)) return v;
    }
    return null;
  };
  if (varint() !== 1) return null;
  if (varint() === null) return null; // codec
  const mhStart = off;
  if (varint() === null) return null; // hash function
  const len = varint();
  if (len === null || len === 0 || off + len !== bytes.length) return null;
  return hex(bytes.subarray(mhStart));
}

const B32 = "abcdefghijklmnopqrstuvwxyz234567";
function base32Bytes(cid) {
  if (!cid.startsWith("b")) return null;
  let bits = 0;
  let acc = 0;
  const bytes = [];
  for (const ch of cid.slice(1)) {
    const v = B32.indexOf(ch);
    if (v < 0) return null;
    acc = ((acc << 5) | v) & 0xffff;
    bits += 5;
    if (bits >= 8) {
      bits -= 8;
      bytes.push((acc >> bits) & 0xff);
    }
  }
  return new Uint8Array(bytes);
}

// CIDv1 raw + sha2-256 ("bafkrei..."): the digest can be checked against the bytes.
function rawSha256Digest(cid) {
  const bytes = base32Bytes(cid);
  if (!bytes) return null;
  if (bytes.length === 36 && bytes[0] === 1 && bytes[1] === 0x55 && bytes[2] === 0x12 && bytes[3] === 0x20) {
    return hex(new Uint8Array(bytes.slice(4)));
  }
  return null;
}

async function loadCid(env, cid) {
  if (!env.MIRROR) throw new HttpError(422, "no_mirror", "input_cid needs the R2 MIRROR binding");
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

const QUEUE_ON_CID = ["no_mirror", "cid_not_found", "input_too_large"];

async function submitTask(request, env, ctx, peer, body) {
  const lim = limits(env);
  const kind = body.kind;
  if (typeof kind !== "string" || !kind || kind.length > MAX_NAME) throw badRequest(`'kind' (string of 1..${MAX_NAME} characters) is required`);
  let id = body.id;
  if (id === undefined || id === null) id = newTaskId();
  else if (typeof id !== "string" || !ID_RE.test(id)) throw badRequest("'id' must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}");
  let input = new Uint8Array(0);
  const cid = body.input_cid ?? null;
  if (cid !== null && (typeof cid !== "string" || !/^[A-Za-z0-9]{8,128}$/.test(cid))) throw badRequest("'input_cid' must be a CID string");
  const cidHash = cid === null ? null : cidMultihash(cid);
  if (cid !== null && cidHash === null) throw badRequest("'input_cid' is not a CID (CIDv0 'Qm…' or base32 CIDv1 'b…')");
  if (body.input_b64 !== undefined && body.input_b64 !== null) {
    if (typeof body.input_b64 !== "string") throw badRequest("'input_b64' must be a base64 string");
    input = decodeB64(body.input_b64);
    if (input === null) throw badRequest("'input_b64' is not valid base64");
    if (cid !== null) throw badRequest("give 'input_b64' or 'input_cid', not both");
  }
  if (input.length > MAX_INLINE_INPUT) {
    throw new HttpError(413, "input_too_large", `input is ${input.length} bytes; inline inputs are limited to ${MAX_INLINE_INPUT} bytes (share larger files by CID)`);
  }
  const params = body.params ?? {};
  if (params === null || typeof params !== "object" || Array.isArray(params) || params instanceof F64) {
    throw badRequest("'params' must be an object");
  }
  const paramsText = stringify(params);
  if (utf8Length(paramsText) > MAX_PARAMS_BYTES) {
    throw new HttpError(413, "params_too_large", `'params' is larger than ${MAX_PARAMS_BYTES} bytes of JSON; pass large data as the input (inline or by CID)`);
  }
  const tagText = body.tag === undefined ? null : stringify(body.tag);
  if (tagText !== null && utf8Length(tagText) > MAX_TAG_BYTES) {
    throw new HttpError(413, "tag_too_large", `'tag' is larger than ${MAX_TAG_BYTES} bytes of JSON`);
  }
  const priority = num(body.priority ?? 0);
  if (!Number.isInteger(priority) || body.priority instanceof F64) throw badRequest("'priority' must be an integer");
  if (body.where !== undefined && !WHERE.includes(body.where)) throw badRequest(`'where' must be one of ${WHERE.join(", ")}`);
  const submitter = body.submitter ?? peer;
  if (typeof submitter !== "string" || submitter.length > MAX_NAME) throw badRequest(`'submitter' must be a string of at most ${MAX_NAME} characters`);
  const version = body.version === undefined || body.version === null ? (KINDS[kind] ? KINDS[kind].version : "1") : String(body.version);
  if (version.length > MAX_NAME) throw badRequest(`'version' must be at most ${MAX_NAME} characters`);
  const queueAllowed = body.queue !== false;
  const noCache = body.no_cache === true;
  const stub = queueStub(env);
  const now = Date.now() / 1000;
  const base = {
    id,
    kind,
    version,
    params: paramsText,
    priority,
    submitter,
    tag: tagText,
    input_cid: cid,
    submitted: now,
  };

  // An id the bridge has seen returns the stored task (idempotent retries); the same
  // round trip reads the cache generation of this kind.
  const { existing, edgeRunning, gen } = await stub.prepare(body.id === undefined || body.id === null ? null : id, kind, version);
  if (existing) {
    if (existing.kind !== kind) throw new HttpError(409, "id_conflict", `task ${id} exists with kind '${existing.kind}'`);
    if (edgeRunning) {
      // A retry of a run that never answered: queue it for pull-mode peers.
      const task = await stub.requeueEdge(id, input, "the bridge did not finish running it (isolate limit, or the answer was lost)");
      return jsonResponse(task.state === "queued" ? 202 : 200, taskJson(task));
    }
    return jsonResponse(200, taskJson(existing));
  }

  let reason = whyNotPortable(kind, version, params, lim);
  if (!reason && cid === null) reason = whyNotAtEdge(kind, input.length, lim.edgeInput);
  if (reason && !queueAllowed) {
    throw new HttpError(422, "not_portable", `${reason}; the request says "queue": false, so it is not held for pull-mode peers`);
  }
  if (cid !== null && !reason) {
    try {
      input = await loadCid(env, cid);
      reason = whyNotAtEdge(kind, input.length, lim.edgeInput);
    } catch (e) {
      // Not in the mirror (or too big for the edge): pull-mode peers fetch it from the mesh.
      if (!(e instanceof HttpError && QUEUE_ON_CID.includes(e.code) && queueAllowed)) throw e;
      reason = e.message;
    }
    if (reason && !queueAllowed) {
      throw new HttpError(422, "not_portable", `${reason}; the request says "queue": false, so it is not held for pull-mode peers`);
    }
    if (reason) input = new Uint8Array(0); // queued by CID: the pull-mode peer fetches the file
  }

  const key = await cacheKey(kind, version, params, cidHash ?? (await bytesMultihash(input)), gen);
  if (!noCache && env.CACHE) {
    const hit = await env.CACHE.get(key);
    if (hit !== null) {
      // Answered from the cache: nothing is written (a repeat is answered the same way),
      // so a cache hit costs no Durable Object write; GET of its id is 404.
      const task = { ...base, state: "done", executed_by: "bridge", output: hit, cached: true, attempts: "[]", started: now, finished: now };
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

  // Recorded before it runs: if the isolate dies (CPU or memory limit) the task is not
  // lost; a retry queues it for pull-mode peers, else it fails with that reason.
  const started = Date.now() / 1000;
  await stub.put(
    {
      ...base,
      state: "running",
      executed_by: "bridge",
      attempts: JSON.stringify([{ peer: "bridge", started, ended: null, error: null }]),
      started,
    },
    null,
  );
  const result = await runKind(kind, input, params, validateParams);
  const finished = Date.now() / 1000;
  const outputText = result.ok ? stringify(result.output) : null;
  const task = await stub.finishEdge(id, {
    state: result.ok ? "done" : "failed",
    output: outputText,
    error: result.ok ? null : result.error,
    attempts: JSON.stringify([{ peer: "bridge", started, ended: finished, error: result.ok ? null : result.error }]),
    finished,
  });
  if (result.ok && !noCache && env.CACHE && outputText.length < 20 * 1024 * 1024) {
    ctx.waitUntil(env.CACHE.put(key, outputText, { expirationTtl: lim.cacheTtl }).catch(() => {}));
  }
  return jsonResponse(200, taskJson(task));
}

const MAX_LEASE_KINDS = 1000;

function parseKinds(v) {
  const out = {};
  const bad = () => badRequest("'kinds' must be a list of kind names or a {name: version} map");
  if (Array.isArray(v)) {
    for (const k of v) {
      if (typeof k !== "string" || !k) throw bad();
      const at = k.indexOf("@");
      if (at > 0) out[k.slice(0, at)] = k.slice(at + 1);
      else out[k] = null;
    }
  } else if (v && typeof v === "object" && !(v instanceof F64)) {
    for (const k of Object.keys(v)) out[k] = v[k] === null ? null : String(num(v[k]));
  } else throw bad();
  if (Object.keys(out).length > MAX_LEASE_KINDS) throw badRequest(`'kinds' names at most ${MAX_LEASE_KINDS} kinds`);
  return out;
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

const COMPLETE_REFUSALS = {
  not_leased: [409, "not_leased", (id) => `task ${id} is not leased; lease it with POST /v1/lease before posting its result`],
  lease_expired: [409, "lease_expired", (id) => `your lease on task ${id} expired and the task went back to the queue`],
  not_lease_holder: [403, "not_lease_holder", (id) => `task ${id} is leased by another peer; only the lease holder may post its result`],
};

async function completeTask(env, ctx, peer, id, body) {
  const ok = body.ok;
  if (typeof ok !== "boolean") throw badRequest("'ok' (boolean) is required");
  const error = body.error ?? null;
  if (!ok && (typeof error !== "string" || !error)) throw badRequest("'error' (string) is required when ok is false");
  // `executor` in the body is ignored: the executor is the authenticated lease holder.
  if (body.signature !== undefined && body.signature !== null && (typeof body.signature !== "string" || body.signature.length > 1024)) {
    throw badRequest("'signature' must be a string of at most 1024 characters");
  }
  // The output is stored exactly as sent (floats stay floats: the parser kept them).
  const outputText = ok ? stringify(body.output === undefined ? null : body.output) : null;
  const res = await queueStub(env).complete(id, peer, {
    ok,
    outputText,
    error: ok ? null : String(error).slice(0, 2000),
    signature: body.signature ?? null,
  });
  if (res.status === "missing") throw new HttpError(404, "not_found", `no task ${id}`);
  if (res.status === "finished") {
    return errorResponse(409, "already_finished", `task ${id} is already ${res.task.state}`);
  }
  if (COMPLETE_REFUSALS[res.status]) {
    const [status, code, message] = COMPLETE_REFUSALS[res.status];
    throw new HttpError(status, code, message(id));
  }
  // Only a lease holder's result reaches this point, so only those are cached.
  if (ok && res.cacheKey && env.CACHE && outputText.length < 20 * 1024 * 1024) {
    ctx.waitUntil(env.CACHE.put(res.cacheKey, outputText, { expirationTtl: limits(env).cacheTtl }).catch(() => {}));
  }
  return jsonResponse(200, taskJson(res.task));
}

// O(1) and consistent: bump the generation of the scope (the DO is the one place that
// holds it); keys of older generations are never read again and expire by their TTL.
async function invalidate(env, body) {
  const prefix = body.prefix ?? "";
  if (typeof prefix !== "string" || prefix.length > 2 * MAX_NAME + 2) {
    throw badRequest("'prefix' must be a string (a kind name, 'kind/version', or '')");
  }
  const scope = prefix.replace(/\/+$/, "");
  const parts = scope ? scope.split("/") : [];
  if (parts.length > 2 || parts.some((p) => !p)) throw badRequest("'prefix' must be '', '<kind>' or '<kind>/<version>'");
  const generation = await queueStub(env).bumpCacheGen(parts.join("/"));
  return jsonResponse(200, { scope: parts.join("/"), generation });
}

async function rotate(env, role, body) {
  if (role !== "admin") {
    throw new HttpError(403, "admin_only", "rotating the bridge key needs an admin request (signed with the master key)");
  }
  const epoch = num(body.epoch);
  if (!Number.isSafeInteger(epoch) || epoch < 1 || body.epoch instanceof F64) throw badRequest("'epoch' must be an integer >= 1");
  const key = typeof body.key === "string" ? body.key.toLowerCase() : null;
  if (!key || !/^[0-9a-f]{64}$/.test(key) || !masterFromHex(key)) throw badRequest("'key' must be 32 bytes in hex");
  const res = await queueStub(env).rotate(epoch, key);
  if (!res.ok) throw new HttpError(409, res.code, res.message, {}, { epoch: res.epoch });
  return jsonResponse(200, { epoch: res.epoch });
}

function notAllowed(method, path) {
  return new HttpError(405, "method_not_allowed", `${method} is not allowed on ${path}`);
}

async function handleV1(request, env, ctx, url) {
  const lim = limits(env);
  // Headers and signature first, then the body: nothing large is read for a stranger.
  const auth = parseAuth(request, url, lim);
  checkDeclaredLength(request, lim.maxBody);
  const admit = await queueStub(env).authorize(auth, lim.skew, lim.rate, lim.burst);
  if (!admit.ok) {
    const headers = admit.code === "rate_limited" ? { "Retry-After": String(admit.retryAfter) } : {};
    throw new HttpError(admit.status, admit.code, admit.message, headers, admit.code === "stale_key" ? { epoch: admit.epoch } : null);
  }
  const { peer, role } = admit;
  const body = await readBody(request, lim.maxBody);
  if ((await sha256Hex(body)) !== auth.bodyHash) {
    throw new HttpError(401, "bad_content_hash", "the body does not match X-Teammesh-Content-SHA256 (the request was altered)");
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
      const { tasks, more } = await queueStub(env).list(state, kind, limit);
      return jsonResponse(200, { tasks: tasks.map(taskJson), more });
    }
    throw notAllowed(method, path);
  }
  if (segments[1] === "tasks" && segments.length === 3) {
    if (method !== "GET") throw notAllowed(method, path);
    const id = decodePathSegment(segments[2]);
    const task = await queueStub(env).get(id);
    if (!task) throw new HttpError(404, "not_found", `no task ${id}`);
    return jsonResponse(200, taskJson(task));
  }
  if (segments[1] === "tasks" && segments.length === 4 && segments[3] === "result") {
    if (method !== "POST") throw notAllowed(method, path);
    return completeTask(env, ctx, peer, decodePathSegment(segments[2]), json());
  }
  if (path === "/v1/lease") {
    if (method !== "POST") throw notAllowed(method, path);
    return lease(env, peer, json());
  }
  if (path === "/v1/cache/invalidate") {
    if (method !== "POST") throw notAllowed(method, path);
    return invalidate(env, json());
  }
  if (path === "/v1/admin/rotate") {
    if (method !== "POST") throw notAllowed(method, path);
    return rotate(env, role, json());
  }
  throw new HttpError(404, "not_found", `no route ${method} ${path}`);
}

async function health(env) {
  return jsonResponse(200, {
    ok: true,
    version: env.VERSION ?? "dev",
    bindings: { queue: !!env.QUEUE, cache: !!env.CACHE, mirror: !!env.MIRROR },
    key_configured: !!masterFromHex(env.BRIDGE_KEY),
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
              "Content-Type, X-Teammesh-Peer, X-Teammesh-Timestamp, X-Teammesh-Nonce, X-Teammesh-Content-SHA256," +
              " X-Teammesh-Signature",
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
      if (e instanceof HttpError) response = errorResponse(e.status, e.code, e.message, e.headers, e.extra);
      else {
        // The details go to the Worker's log, never to the client (they can name internals).
        const ref = hex(crypto.getRandomValues(new Uint8Array(6)));
        console.error(`bridge error ${ref}`, e && e.stack ? e.stack : e);
        response = errorResponse(500, "internal", `internal error (reference ${ref} in the Worker's log)`);
      }
    }
    for (const [k, v] of Object.entries(cors)) response.headers.set(k, v);
    return response;
  },
};

