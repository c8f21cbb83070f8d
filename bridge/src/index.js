// teammesh Cloudflare bridge: the Worker entry point and router.
//
//   GET  /health                      unauthenticated liveness + bindings
//   POST /v1/tasks                    run a portable kind now, or queue for pull-mode peers
//   GET  /v1/tasks?state=&kind=&limit list tasks
//   GET  /v1/tasks/{id}               one task
//   POST /v1/tasks/{id}/result        complete a leased task (pull mode)
//   POST /v1/tasks/{id}/cancel        its submitter (or an admin) cancels a task
//   POST /v1/lease                    lease queued tasks (pull mode)
//   POST /v1/cache/invalidate         drop cached results (a kind, a version, or all)
//   POST /v1/admin/rotate             admins: new master bridge key and epoch
//
// Every /v1 request is HMAC-signed with the member's key, derived from the team's master
// key, or with the master for admin requests (see src/auth.js); errors are JSON
// {"error": {"code", "message"}}. docs/BRIDGE.md is the reference.

import { deriveMemberKey, HttpError, importHmac, masterFromHex, parseAuth } from "./auth.js";
import { OLD_EPOCHS } from "./control.js";
import { bytesToBase64, F64, orderedObject, parseJSON, Raw, sortedJSON, stringify } from "./json.js";
import { KINDS, portableNames, runKind, whyNotAtEdge, whyNotPortable } from "./kinds/index.js";
import { validateParams } from "./kinds/params.js";
import { LIST_BYTES } from "./queue.js";
import { dagPbV1, getBlob, INLINE_BYTES, mirrorKey, putBlob } from "./r2.js";
import { controlStub, gateStub, shardCount, shardStub, taskShard } from "./shards.js";
import { fromHex, hex, sha256Hex } from "./util.js";

export { Control } from "./control.js";
export { PeerGate } from "./gate.js";
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

// --- the control object's data, cached per isolate -------------------------------------
// Master keys and cache generations are read through this cache: a Control round trip at
// most once every CONTROL_CACHE_S (var, default 5 s) per isolate, plus one per (kind,
// version) for its generations. A rotation or invalidation takes effect at once in the
// isolate that made it and within CONTROL_CACHE_S in every other one (docs/BRIDGE.md).
const CONTROL = { at: 0, snap: null, gens: new Map(), keys: new Map(), members: new Map() };
const MAX_CACHED = 4096;

function controlTtlMs(env) {
  const v = Number(env.CONTROL_CACHE_S ?? 5);
  return Number.isFinite(v) && v >= 0 ? v * 1000 : 5000;
}

async function controlSnapshot(env) {
  const now = Date.now();
  if (CONTROL.snap && now - CONTROL.at < controlTtlMs(env)) return CONTROL.snap;
  const snap = await controlStub(env).snapshot();
  if (!CONTROL.snap || CONTROL.snap.changes !== snap.changes) CONTROL.gens.clear();
  CONTROL.snap = snap;
  CONTROL.at = now;
  return snap;
}

function forgetControl() {
  CONTROL.at = 0;
  CONTROL.snap = null;
  CONTROL.gens.clear();
}

async function cacheGen(env, kind, version) {
  const snap = await controlSnapshot(env);
  const k = `${kind}\n${version}`;
  const hit = CONTROL.gens.get(k);
  if (hit && hit.changes === snap.changes) return hit.gen;
  const { gen, changes } = await controlStub(env).gens(kind, version);
  if (changes !== snap.changes) forgetControl(); // the snapshot is older: refresh it next time
  if (CONTROL.gens.size >= MAX_CACHED) CONTROL.gens.clear();
  CONTROL.gens.set(k, { gen, changes });
  return gen;
}

async function hmacKey(raw) {
  const id = hex(raw);
  let key = CONTROL.keys.get(id);
  if (!key) {
    if (CONTROL.keys.size >= 64) CONTROL.keys.clear();
    key = await importHmac(raw);
    CONTROL.keys.set(id, key);
  }
  return key;
}

// The team's masters, newest first: the stored epochs, and epoch 0 from env.BRIDGE_KEY.
async function teamKeys(env) {
  const snap = await controlSnapshot(env);
  const all = snap.masters.map((m) => ({ epoch: m.epoch, raw: fromHex(m.key) }));
  const env0 = masterFromHex(env.BRIDGE_KEY);
  if (env0 && !all.some((k) => k.epoch === 0) && all.length <= OLD_EPOCHS) all.push({ epoch: 0, raw: env0 });
  if (!all.length) return null;
  for (const k of all) k.key = await hmacKey(k.raw);
  return { current: all[0], old: all.slice(1) };
}

async function memberKey(master, peer) {
  const id = `${hex(master.raw)}/${peer}`;
  let key = CONTROL.members.get(id);
  if (!key) {
    if (CONTROL.members.size >= 1024) CONTROL.members.clear();
    key = await importHmac(await deriveMemberKey(master.key, peer));
    CONTROL.members.set(id, key);
  }
  return key;
}

// "member" (signed with K_P of this master), "admin" (signed with the master), or null
async function roleUnder(master, peer, mac, message) {
  if (await crypto.subtle.verify("HMAC", await memberKey(master, peer), mac, message)) return "member";
  if (await crypto.subtle.verify("HMAC", master.key, mac, message)) return "admin";
  return null;
}

// The signature is checked here, in the Worker; the nonce and the rate limit in the
// peer's own gate object. The rate limit is charged to the authenticated peer only.
async function authorize(env, auth, lim) {
  const keys = await teamKeys(env);
  if (!keys) {
    throw new HttpError(503, "not_configured", "BRIDGE_KEY is not a hex key of at least 16 bytes; set it with `wrangler secret put BRIDGE_KEY` (or .dev.vars)");
  }
  const mac = fromHex(auth.sig);
  const message = new TextEncoder().encode(auth.message);
  const role = await roleUnder(keys.current, auth.peer, mac, message);
  if (!role) {
    for (const old of keys.old) {
      if (await roleUnder(old, auth.peer, mac, message)) {
        throw new HttpError(
          401, "stale_key",
          `the request is signed with a key of epoch ${old.epoch}; the team's bridge key is now at epoch ${keys.current.epoch}: get the new key from a team admin`,
          {}, { epoch: keys.current.epoch },
        );
      }
    }
    throw new HttpError(401, "bad_signature", "signature does not match (wrong key or peer id, or the request was altered)");
  }
  const admit = await gateStub(env, auth.peer).admit(auth.nonce, auth.ts + lim.skew + 1, role === "member", lim.rate, lim.burst, auth.peer);
  if (!admit.ok) {
    const headers = admit.code === "rate_limited" ? { "Retry-After": String(admit.retryAfter) } : {};
    throw new HttpError(admit.status, admit.code, admit.message, headers);
  }
  return { peer: auth.peer, role, keys };
}

// --- inputs and outputs: inline when small, else in R2 by CID ---------------------------
async function inputRef(env, bytes) {
  if (bytes.length <= INLINE_BYTES) return { inline: bytes, key: null, size: bytes.length };
  return { inline: null, key: await putBlob(env, bytes, "the input"), size: bytes.length };
}

async function outputFields(env, outputText) {
  if (outputText === null || outputText === undefined) return { output: null, output_cid: null, output_size: 0 };
  if (outputText.length * 3 <= INLINE_BYTES) return { output: outputText, output_cid: null, output_size: 0 };
  const bytes = new TextEncoder().encode(outputText);
  if (bytes.length <= INLINE_BYTES) return { output: outputText, output_cid: null, output_size: 0 };
  return { output: null, output_cid: await putBlob(env, bytes, "the output"), output_size: bytes.length };
}

// A row whose output is in R2 gets it back (null if the object is gone).
async function withOutput(env, t) {
  if (!t || !t.output_cid || t.output !== null) return t;
  const bytes = await getBlob(env, t.output_cid);
  return { ...t, output: bytes === null ? null : new TextDecoder().decode(bytes) };
}

async function loadCid(env, cid, multihash) {
  if (!env.MIRROR) throw new HttpError(422, "no_mirror", "input_cid needs the R2 MIRROR binding");
  // The mirror's keys are base32 CIDv1 (docs/STORAGE.md); a CIDv0 names a dag-pb node.
  const key = mirrorKey(env, cid.startsWith("Qm") ? dagPbV1(multihash) : cid);
  const obj = await env.MIRROR.get(key);
  if (!obj) throw new HttpError(422, "cid_not_found", `input_cid ${cid} is not in the R2 mirror (key ${key})`);
  if (obj.size > MAX_INLINE_INPUT) {
    await obj.body.cancel().catch(() => {});
    throw new HttpError(413, "input_too_large", `input ${cid} is ${obj.size} bytes; the bridge runs inputs up to ${MAX_INLINE_INPUT} bytes`);
  }
  const data = new Uint8Array(await obj.arrayBuffer());
  const want = rawSha256Digest(cid);
  if (want && (await sha256Hex(data)) !== want) {
    throw new HttpError(422, "cid_mismatch", `the mirror's object for ${cid} does not match its digest`);
  }
  return data;
}

// The first param given as a file, as the node writes it: {"$cid": "<CID>"} and nothing else.
function fileParam(params) {
  for (const [k, v] of Object.entries(params)) {
    if (v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length === 1 && typeof v.$cid === "string") return k;
  }
  return null;
}

const QUEUE_ON_CID = ["no_mirror", "cid_not_found", "input_too_large"];

// KV holds small outputs as the value, larger ones as a reference to R2 (metadata).
async function cacheGet(env, key) {
  const { value, metadata } = await env.CACHE.getWithMetadata(key);
  if (value === null) return null;
  if (metadata && metadata.cid) {
    const bytes = await getBlob(env, metadata.cid);
    return bytes === null ? null : new TextDecoder().decode(bytes);
  }
  return value;
}

function cachePut(env, ctx, key, fields, lim) {
  const put = fields.output_cid
    ? env.CACHE.put(key, "", { expirationTtl: lim.cacheTtl, metadata: { cid: fields.output_cid } })
    : env.CACHE.put(key, fields.output, { expirationTtl: lim.cacheTtl });
  ctx.waitUntil(put.catch(() => {}));
}

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
  const { index, stub } = taskShard(env, id);
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

  // An id the bridge has seen returns the stored task (idempotent retries). A fresh id of
  // the bridge's own making needs no look-up.
  if (body.id !== undefined && body.id !== null) {
    const { existing, edgeRunning } = await stub.prepare(id);
    if (existing) {
      if (existing.kind !== kind) throw new HttpError(409, "id_conflict", `task ${id} exists with kind '${existing.kind}'`);
      if (edgeRunning) {
        // A retry of a run that never answered: queue it for pull-mode peers.
        const ref = await inputRef(env, input);
        const task = await stub.requeueEdge(index, id, ref, "the bridge did not finish running it (isolate limit, or the answer was lost)");
        return jsonResponse(task.state === "queued" ? 202 : 200, taskJson(await withOutput(env, task)));
      }
      return jsonResponse(200, taskJson(await withOutput(env, existing)));
    }
  }

  let reason = whyNotPortable(kind, version, params, lim);
  // A param given as a file ({"$cid": "..."}) is fetched by the pull-mode peer that runs
  // the task; the edge's kinds take no files, and running one on the reference object
  // itself would give a wrong answer, not an error.
  if (!reason && fileParam(params) !== null) reason = `param '${fileParam(params)}' is a file ({"$cid"}), which pull-mode peers fetch`;
  if (!reason && cid === null) reason = whyNotAtEdge(kind, input.length, lim.edgeInput);
  if (reason && !queueAllowed) {
    throw new HttpError(422, "not_portable", `${reason}; the request says "queue": false, so it is not held for pull-mode peers`);
  }
  if (cid !== null && !reason) {
    try {
      input = await loadCid(env, cid, cidHash);
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

  const key = await cacheKey(kind, version, params, cidHash ?? (await bytesMultihash(input)), await cacheGen(env, kind, version));
  if (!noCache && env.CACHE) {
    const hit = await cacheGet(env, key);
    if (hit !== null) {
      // Answered from the cache: nothing is written (a repeat is answered the same way),
      // so a cache hit costs no Durable Object write; GET of its id is 404.
      const task = { ...base, state: "done", executed_by: "bridge", output: hit, cached: true, attempts: "[]", started: now, finished: now };
      return jsonResponse(200, taskJson(task));
    }
  }

  if (reason) {
    const ref = await inputRef(env, input);
    const { task } = await stub.put(
      index,
      { ...base, state: "queued", cache_key: noCache ? null : key, waiting_reason: `${reason}; waiting for a pull-mode peer` },
      ref,
    );
    return jsonResponse(202, taskJson(await withOutput(env, task)));
  }

  // Recorded before it runs: if the isolate dies (CPU or memory limit) the task is not
  // lost; a retry queues it for pull-mode peers, else it fails with that reason.
  const started = Date.now() / 1000;
  const recorded = await stub.put(
    index,
    {
      ...base,
      state: "running",
      executed_by: "bridge",
      attempts: JSON.stringify([{ peer: "bridge", started, ended: null, error: null }]),
      started,
    },
    null,
  );
  if (recorded.existing) return jsonResponse(200, taskJson(await withOutput(env, recorded.task)));
  const result = await runKind(kind, input, params, validateParams);
  const finished = Date.now() / 1000;
  const outputText = result.ok ? stringify(result.output) : null;
  const fields = await outputFields(env, outputText);
  const task = await stub.finishEdge(id, {
    state: result.ok ? "done" : "failed",
    ...fields,
    error: result.ok ? null : result.error,
    attempts: JSON.stringify([{ peer: "bridge", started, ended: finished, error: result.ok ? null : result.error }]),
    finished,
  });
  if (result.ok && !noCache && env.CACHE) cachePut(env, ctx, key, fields, lim);
  // the row this run finished (not one a retry queued meanwhile) has this run's output
  return jsonResponse(200, taskJson(task.finished === finished ? { ...task, output: outputText } : await withOutput(env, task)));
}

const MAX_LEASE_KINDS = 1000;
// One lease answer carries at most this many input bytes (at least one task): it stays
// far below the 32 MiB RPC limit and the isolate's 128 MB.
const LEASE_BYTES = 8 * 1024 * 1024;

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

// Leasing by kind: the control object names the shards holding queued tasks of these
// kinds; each shows its best `max`; the best of all (priority, then submission order) are
// claimed, within LEASE_BYTES of input.
async function lease(env, peer, body) {
  const kinds = parseKinds(body.kinds);
  const max = num(body.max ?? 1);
  const leaseS = num(body.lease_s ?? 60);
  if (!Number.isInteger(max) || max < 1 || max > 100) throw badRequest("'max' must be an integer from 1 to 100");
  if (typeof leaseS !== "number" || !(leaseS >= 1 && leaseS <= 3600)) throw badRequest("'lease_s' must be a number from 1 to 3600");
  const names = Object.keys(kinds);
  const shards = names.length ? await controlStub(env).shardsFor(names) : [];
  const n = shardCount(env);
  const peeks = await Promise.all(
    shards.filter((s) => s < n).map(async (s) => (await shardStub(env, s).peek(kinds, max)).map((c) => ({ ...c, shard: s }))),
  );
  const best = peeks.flat().sort((a, b) => b.priority - a.priority || a.submitted - b.submitted || a.seq - b.seq);
  const chosen = new Map();
  let bytes = 0;
  let count = 0;
  for (const c of best) {
    if (count === max || (count && bytes + c.size > LEASE_BYTES)) break;
    bytes += c.size;
    count++;
    if (!chosen.has(c.shard)) chosen.set(c.shard, []);
    chosen.get(c.shard).push(c.id);
  }
  const claimed = (
    await Promise.all([...chosen].map(([s, ids]) => shardStub(env, s).claim(s, peer, ids, leaseS)))
  ).flat();
  claimed.sort((a, b) => b.task.priority - a.task.priority || a.task.submitted - b.task.submitted);
  const tasks = [];
  for (const { task, input, leaseUntil } of claimed) {
    let bytesIn = input ?? new Uint8Array(0);
    let inputCid = task.input_cid ?? null;
    if (task.input_key) {
      const fetched = await getBlob(env, task.input_key);
      // gone from R2: the peer fetches it by CID like any file input
      if (fetched === null) inputCid = inputCid ?? task.input_key;
      else bytesIn = fetched;
    }
    const o = orderedObject();
    o.id = task.id;
    o.kind = task.kind;
    o.version = task.version;
    o.input_b64 = bytesToBase64(bytesIn);
    o.input_cid = inputCid;
    o.params = new Raw(task.params);
    o.priority = task.priority;
    o.submitter = task.submitter ?? null;
    o.lease_until = new F64(leaseUntil);
    tasks.push(o);
  }
  return jsonResponse(200, { tasks });
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
  const { stub } = taskShard(env, id);
  // A large output goes to R2 only once the poster is known to hold the lease.
  const large = outputText !== null && utf8Length(outputText) > INLINE_BYTES;
  const check = large ? await stub.leaseStatus(id, peer) : { status: "ok" };
  const res =
    check.status !== "ok"
      ? check
      : await stub.complete(id, peer, {
        ok,
        ...(await outputFields(env, outputText)),
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
  if (ok && res.cacheKey && env.CACHE) cachePut(env, ctx, res.cacheKey, res.task, limits(env));
  return jsonResponse(200, taskJson({ ...res.task, output: outputText }));
}

// Idempotent: a task that already ended is answered as it is (200), so a retried cancel
// and a cancel that lost the race with the result both see the final state.
async function cancelTask(env, peer, role, id) {
  const res = await taskShard(env, id).stub.cancel(id, peer, role === "admin");
  if (res.status === "missing") throw new HttpError(404, "not_found", `no task ${id}`);
  if (res.status === "not_submitter") {
    throw new HttpError(403, "not_submitter", `task ${id} was submitted by another member; only its submitter or an admin may cancel it`);
  }
  return jsonResponse(200, taskJson(await withOutput(env, res.task)));
}

// Across shards: each shard's best `limit` within its share of LIST_BYTES, merged in the
// order asked for; outputs kept in R2 are fetched for the rows answered.
async function listTasks(env, state, kind, limit) {
  const n = shardCount(env);
  const budget = Math.ceil(LIST_BYTES / n);
  const parts = await Promise.all(Array.from({ length: n }, (_, s) => shardStub(env, s).list(state, kind, limit, budget)));
  let more = parts.some((p) => p.more);
  const all = parts.flatMap((p) => p.tasks);
  if (state === "queued") all.sort((a, b) => b.priority - a.priority || a.submitted - b.submitted);
  else all.sort((a, b) => b.submitted - a.submitted);
  const rows = [];
  let bytes = 0;
  for (const t of all) {
    const size = t.params.length + t.output_size + (t.output ?? "").length + (t.tag ?? "").length;
    if (rows.length === limit || (rows.length && bytes + size > LIST_BYTES)) {
      more = true;
      break;
    }
    bytes += size;
    rows.push(t);
  }
  return { tasks: await Promise.all(rows.map((t) => withOutput(env, t))), more };
}

// O(1) and consistent: bump the generation of the scope (the control object is the one
// place that holds it); keys of older generations are never read again and expire by
// their TTL.
async function invalidate(env, body) {
  const prefix = body.prefix ?? "";
  if (typeof prefix !== "string" || prefix.length > 2 * MAX_NAME + 2) {
    throw badRequest("'prefix' must be a string (a kind name, 'kind/version', or '')");
  }
  const scope = prefix.replace(/\/+$/, "");
  const parts = scope ? scope.split("/") : [];
  if (parts.length > 2 || parts.some((p) => !p)) throw badRequest("'prefix' must be '', '<kind>' or '<kind>/<version>'");
  const generation = await controlStub(env).bumpCacheGen(parts.join("/"));
  forgetControl();
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
  const env0 = masterFromHex(env.BRIDGE_KEY);
  const res = await controlStub(env).rotate(epoch, key, env0 ? hex(env0) : null);
  forgetControl();
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
  const { peer, role } = await authorize(env, auth, lim);
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
      const { tasks, more } = await listTasks(env, state, kind, limit);
      return jsonResponse(200, { tasks: tasks.map(taskJson), more });
    }
    throw notAllowed(method, path);
  }
  if (segments[1] === "tasks" && segments.length === 3) {
    if (method !== "GET") throw notAllowed(method, path);
    const id = decodePathSegment(segments[2]);
    const task = await withOutput(env, await taskShard(env, id).stub.get(id));
    if (!task) throw new HttpError(404, "not_found", `no task ${id}`);
    return jsonResponse(200, taskJson(task));
  }
  if (segments[1] === "tasks" && segments.length === 4 && segments[3] === "result") {
    if (method !== "POST") throw notAllowed(method, path);
    return completeTask(env, ctx, peer, decodePathSegment(segments[2]), json());
  }
  if (segments[1] === "tasks" && segments.length === 4 && segments[3] === "cancel") {
    if (method !== "POST") throw notAllowed(method, path);
    return cancelTask(env, peer, role, decodePathSegment(segments[2]));
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
    // the sharded layout (docs/BRIDGE.md, "Where things are stored")
    objects: { shards: shardCount(env), gate: !!env.GATE, control: !!env.CONTROL },
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

