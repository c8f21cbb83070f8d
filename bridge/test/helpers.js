import { env, SELF } from "cloudflare:test";
import { shardCount, shardOf } from "../src/shards.js";

// The team's master key of epoch 0 (the BRIDGE_KEY binding in vitest.config.js).
export const KEY_HEX = "7e57".repeat(16);

export function hex(buf) {
  return [...new Uint8Array(buf)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

export function randomHex(n = 16) {
  return hex(crypto.getRandomValues(new Uint8Array(n)));
}

const fromHexBytes = (h) => new Uint8Array(h.match(/../g).map((x) => parseInt(x, 16)));

async function hmac(keyHex, data) {
  const key = await crypto.subtle.importKey("raw", fromHexBytes(keyHex), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  return hex(await crypto.subtle.sign("HMAC", key, typeof data === "string" ? new TextEncoder().encode(data) : data));
}

// K_P = HMAC-SHA256(M, "teammesh-bridge-member-v1\0" || peer), as protocols/bridgekey.py.
export async function memberKey(masterHex, peer) {
  const label = new TextEncoder().encode("teammesh-bridge-member-v1\0");
  const p = new TextEncoder().encode(peer);
  const msg = new Uint8Array(label.length + p.length);
  msg.set(label);
  msg.set(p, label.length);
  return hmac(masterHex, msg);
}

// The auth headers of one request. keyHex: the signing key (default: the member key of
// `peer` under the master `master`, default KEY_HEX); admin: sign with the master itself.
export async function sign({ method, path, body = "", peer = "vitest", keyHex, master = KEY_HEX, admin = false, ts, nonce, bodyHash }) {
  const bytes = typeof body === "string" ? new TextEncoder().encode(body) : body;
  bodyHash = bodyHash ?? hex(await crypto.subtle.digest("SHA-256", bytes));
  ts = ts ?? String(Math.floor(Date.now() / 1000));
  nonce = nonce ?? randomHex();
  const key = keyHex ?? (admin ? master : await memberKey(master, peer));
  const msg = ["teammesh-bridge-v2", method, path, peer, ts, nonce, bodyHash].join("\n");
  return {
    "X-Teammesh-Peer": peer,
    "X-Teammesh-Timestamp": ts,
    "X-Teammesh-Nonce": nonce,
    "X-Teammesh-Content-SHA256": bodyHash,
    "X-Teammesh-Signature": await hmac(key, msg),
  };
}

// Signed request through the Worker; returns {status, json, text, headers}.
export async function call(method, path, body, { peer = "vitest", headers = {}, signOpts = {}, sign: doSign = true } = {}) {
  const text = body === undefined ? "" : typeof body === "string" ? body : JSON.stringify(body);
  const h = { "Content-Type": "application/json", "X-Teammesh-Peer": peer };
  if (doSign) Object.assign(h, await sign({ method, path, body: text, peer, ...signOpts }));
  Object.assign(h, headers);
  const res = await SELF.fetch("https://bridge.test" + path, {
    method,
    headers: h,
    body: method === "GET" ? undefined : text,
  });
  const out = await res.text();
  let json = null;
  try {
    json = JSON.parse(out);
  } catch {
    /* not JSON */
  }
  return { status: res.status, json, text: out, headers: res.headers };
}

export function b64(s) {
  return btoa(s);
}

// The Durable Objects behind the Worker (src/shards.js): the shard of a task id, a peer's
// gate, the control object.
export function shardFor(id) {
  const i = shardOf(id, shardCount(env));
  return { index: i, stub: env.QUEUE.get(env.QUEUE.idFromName(`shard-${i}`)) };
}

export function shardAt(i) {
  return env.QUEUE.get(env.QUEUE.idFromName(`shard-${i}`));
}

export function gateFor(peer) {
  return env.GATE.get(env.GATE.idFromName(`peer/${peer}`));
}

export function control() {
  return env.CONTROL.get(env.CONTROL.idFromName("control"));
}
