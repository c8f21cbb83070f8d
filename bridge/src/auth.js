// Request signing (docs/BRIDGE.md, "Signing"). Every /v1 request carries
//   X-Teammesh-Peer            the member's peer id (it is inside the signed string)
//   X-Teammesh-Timestamp       unix seconds
//   X-Teammesh-Nonce           random hex, 16..128 chars, never reused
//   X-Teammesh-Content-SHA256  hex(sha256(body)), so the signature is checked before the
//                              body is read; the body is checked against it afterwards
//   X-Teammesh-Signature       hex(HMAC-SHA256(K, SIGNED_STRING))
// SIGNED_STRING = "teammesh-bridge-v2\n" METHOD \n PATH_WITH_QUERY \n peer \n timestamp \n
//                 nonce \n content_sha256
// K is the member key K_P = HMAC-SHA256(M, "teammesh-bridge-member-v1\0" || peer) derived
// from the team's master key M (protocols/bridgekey.py), or M itself for an admin. The
// Worker derives K_P from the peer the request names, so the peer id is authenticated.
// The signature itself is verified by the TaskQueue Durable Object, which holds the
// current master and its epoch (rotation: POST /v1/admin/rotate).

import { fromHex } from "./util.js";

export const SIGNED_PREFIX = "teammesh-bridge-v2";
const MEMBER_LABEL = new TextEncoder().encode("teammesh-bridge-member-v1\0");
const PEER_RE = /^[A-Za-z0-9._:-]{1,128}$/;
const SHA256_RE = /^[0-9a-f]{64}$/;

export class HttpError extends Error {
  constructor(status, code, message, headers = {}, extra = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.headers = headers;
    this.extra = extra; // more fields for the JSON error body (e.g. the key epoch)
  }
}

const unauthorized = (code, message) => new HttpError(401, code, message);

// Headers -> the parts the Durable Object verifies. No body is read here.
export function parseAuth(request, url, lim) {
  const h = request.headers;
  const peer = h.get("X-Teammesh-Peer");
  const ts = h.get("X-Teammesh-Timestamp");
  const nonce = h.get("X-Teammesh-Nonce");
  const sig = h.get("X-Teammesh-Signature");
  const bodyHash = h.get("X-Teammesh-Content-SHA256");
  if (!peer || !ts || !nonce || !sig || !bodyHash) {
    throw unauthorized(
      "missing_signature",
      "sign the request: X-Teammesh-Peer, X-Teammesh-Timestamp, X-Teammesh-Nonce," +
        " X-Teammesh-Content-SHA256 and X-Teammesh-Signature are required (docs/BRIDGE.md)",
    );
  }
  // "bridge" names the Worker itself in executed_by and attempts: no client may be it.
  if (!PEER_RE.test(peer) || peer === "bridge") throw unauthorized("bad_peer", "X-Teammesh-Peer must be a peer id");
  if (!/^\d{1,12}$/.test(ts)) throw unauthorized("bad_timestamp", "X-Teammesh-Timestamp must be unix seconds");
  const skew = Math.abs(Date.now() / 1000 - Number(ts));
  if (skew > lim.skew) {
    throw unauthorized("stale_timestamp", `timestamp is ${Math.round(skew)} s away from the bridge's clock (limit ${lim.skew} s)`);
  }
  if (!/^[0-9a-fA-F]{16,128}$/.test(nonce)) throw unauthorized("bad_nonce", "X-Teammesh-Nonce must be 16..128 hex characters");
  if (!SHA256_RE.test(bodyHash)) {
    throw unauthorized("bad_content_hash", "X-Teammesh-Content-SHA256 must be 64 lowercase hex characters");
  }
  if (!/^[0-9a-fA-F]{64}$/.test(sig)) throw unauthorized("bad_signature", "X-Teammesh-Signature must be 64 hex characters");
  const message = [SIGNED_PREFIX, request.method, url.pathname + url.search, peer, ts, nonce, bodyHash].join("\n");
  return { peer, ts: Number(ts), nonce: nonce.toLowerCase(), sig: sig.toLowerCase(), bodyHash, message };
}

export async function importHmac(raw) {
  return crypto.subtle.importKey("raw", raw, { name: "HMAC", hash: "SHA-256" }, false, ["sign", "verify"]);
}

// K_P = HMAC-SHA256(M, label || peer), as protocols/bridgekey.py derive_member_key.
export async function deriveMemberKey(masterKey, peer) {
  const peerBytes = new TextEncoder().encode(peer);
  const msg = new Uint8Array(MEMBER_LABEL.length + peerBytes.length);
  msg.set(MEMBER_LABEL, 0);
  msg.set(peerBytes, MEMBER_LABEL.length);
  return new Uint8Array(await crypto.subtle.sign("HMAC", masterKey, msg));
}

// A master key in hex, at least 16 bytes; null otherwise.
export function masterFromHex(text) {
  if (typeof text !== "string") return null;
  const raw = fromHex(text.trim());
  return raw && raw.length >= 16 ? raw : null;
}
