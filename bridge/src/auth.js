// Request signing: every /v1 request carries
//   X-Teammesh-Peer       the member's peer id
//   X-Teammesh-Timestamp  unix seconds
//   X-Teammesh-Nonce      random hex, 16..128 chars, never reused
//   X-Teammesh-Signature  hex(HMAC-SHA256(key, METHOD \n PATH_WITH_QUERY \n timestamp \n
//                         nonce \n hex(sha256(body))))
// with the team bridge key (secret BRIDGE_KEY, hex). Nonces are remembered for 10 minutes
// by the queue Durable Object (replays: 401), which also rate-limits per peer id.

import { fromHex, sha256Hex } from "./util.js";

export class HttpError extends Error {
  constructor(status, code, message, headers = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.headers = headers;
  }
}

const keyCache = new Map();

async function hmacKey(hexKey) {
  let key = keyCache.get(hexKey);
  if (!key) {
    const raw = fromHex(hexKey);
    if (!raw || raw.length < 16) {
      throw new HttpError(503, "not_configured", "BRIDGE_KEY is not a hex key of at least 16 bytes; set it with `wrangler secret put BRIDGE_KEY`");
    }
    key = await crypto.subtle.importKey("raw", raw, { name: "HMAC", hash: "SHA-256" }, false, ["sign", "verify"]);
    keyCache.set(hexKey, key);
  }
  return key;
}

const unauthorized = (code, message) => new HttpError(401, code, message);

export async function authenticate(request, env, url, body, lim) {
  if (!env.BRIDGE_KEY) {
    throw new HttpError(503, "not_configured", "the BRIDGE_KEY secret is not set; run `wrangler secret put BRIDGE_KEY` (or add it to .dev.vars)");
  }
  const h = request.headers;
  const peer = h.get("X-Teammesh-Peer");
  const ts = h.get("X-Teammesh-Timestamp");
  const nonce = h.get("X-Teammesh-Nonce");
  const sig = h.get("X-Teammesh-Signature");
  if (!peer || !ts || !nonce || !sig) {
    throw unauthorized(
      "missing_signature",
      "sign the request: X-Teammesh-Peer, X-Teammesh-Timestamp, X-Teammesh-Nonce and X-Teammesh-Signature are required",
    );
  }
  if (!/^[A-Za-z0-9._:-]{1,128}$/.test(peer)) throw unauthorized("bad_peer", "X-Teammesh-Peer must be a peer id");
  if (!/^\d{1,12}$/.test(ts)) throw unauthorized("bad_timestamp", "X-Teammesh-Timestamp must be unix seconds");
  const skew = Math.abs(Date.now() / 1000 - Number(ts));
  if (skew > lim.skew) {
    throw unauthorized("stale_timestamp", `timestamp is ${Math.round(skew)} s away from the bridge's clock (limit ${lim.skew} s)`);
  }
  if (!/^[0-9a-fA-F]{16,128}$/.test(nonce)) throw unauthorized("bad_nonce", "X-Teammesh-Nonce must be 16..128 hex characters");
  const mac = /^[0-9a-fA-F]{64}$/.test(sig) ? fromHex(sig) : null;
  if (!mac) throw unauthorized("bad_signature", "X-Teammesh-Signature must be 64 hex characters");
  const message = `${request.method}\n${url.pathname}${url.search}\n${ts}\n${nonce}\n${await sha256Hex(body)}`;
  const key = await hmacKey(env.BRIDGE_KEY.trim());
  const good = await crypto.subtle.verify("HMAC", key, mac, new TextEncoder().encode(message));
  if (!good) throw unauthorized("bad_signature", "signature does not match (wrong key, or the request was altered)");
  return peer;
}
