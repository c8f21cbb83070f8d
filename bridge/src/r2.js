// Large task inputs and outputs live in R2 by CID, in the storage mirror's layout
// (docs/STORAGE.md, "R2 mirror"): the key is MIRROR_PREFIX (default "ipfs/") followed by
// the base32 CIDv1, and the body is the plain bytes. The bridge names what it stores by
// the CIDv1 raw + sha2-256 of the bytes ("bafkrei..."), which any reader can check.
// Durable Object rows hold only the CID and the size.

import { HttpError } from "./auth.js";
import { hex, sha256 } from "./util.js";

// Inputs and outputs up to this many bytes stay inline in their row; larger ones go to R2.
export const INLINE_BYTES = 64 * 1024;

const B32 = "abcdefghijklmnopqrstuvwxyz234567";

export function base32(bytes) {
  let bits = 0;
  let acc = 0;
  let out = "";
  for (const b of bytes) {
    acc = ((acc << 8) | b) & 0xffff;
    bits += 8;
    while (bits >= 5) {
      bits -= 5;
      out += B32[(acc >> bits) & 31];
    }
  }
  if (bits) out += B32[(acc << (5 - bits)) & 31];
  return out;
}

// CIDv1 raw sha2-256 of the bytes.
export async function rawCidOf(bytes) {
  const digest = await sha256(bytes);
  return "b" + base32(new Uint8Array([1, 0x55, 0x12, 0x20, ...digest]));
}

// CIDv1 (base32) of a multihash given in hex, with codec dag-pb (what a CIDv0 names).
export function dagPbV1(multihashHex) {
  const mh = multihashHex.match(/../g).map((x) => parseInt(x, 16));
  return "b" + base32(new Uint8Array([1, 0x70, ...mh]));
}

export function mirrorKey(env, cidV1) {
  return (env.MIRROR_PREFIX ?? "ipfs/") + cidV1;
}

// Store `bytes` under their raw CID; returns the CID. Content addressing makes it
// idempotent: the same bytes are the same object.
export async function putBlob(env, bytes, what) {
  if (!env.MIRROR) {
    throw new HttpError(413, "needs_r2", `${what} is ${bytes.length} bytes; more than ${INLINE_BYTES} bytes needs the R2 MIRROR binding`);
  }
  const cid = await rawCidOf(bytes);
  await env.MIRROR.put(mirrorKey(env, cid), bytes, { sha256: hex(await sha256(bytes)) });
  return cid;
}

// The bytes stored under a raw CID, checked against it; null if the object is gone.
export async function getBlob(env, cid) {
  if (!env.MIRROR) return null;
  const obj = await env.MIRROR.get(mirrorKey(env, cid));
  if (!obj) return null;
  const bytes = new Uint8Array(await obj.arrayBuffer());
  if ((await rawCidOf(bytes)) !== cid) return null;
  return bytes;
}
