// base64.encode / base64.decode with the exact acceptance rules and messages of the
// Python kinds (node/kinds/basic.py).

import { pyBytesRepr } from "../util.js";

const STD = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

export function b64encode(data, urlsafe = false) {
  const A = urlsafe ? URL : STD;
  const parts = [];
  let s = "";
  const n = data.length;
  let i = 0;
  for (; i + 2 < n; i += 3) {
    const x = (data[i] << 16) | (data[i + 1] << 8) | data[i + 2];
    s += A[x >> 18] + A[(x >> 12) & 63] + A[(x >> 6) & 63] + A[x & 63];
    if (s.length >= 65536) {
      parts.push(s);
      s = "";
    }
  }
  if (n - i === 1) {
    const x = data[i] << 16;
    s += A[x >> 18] + A[(x >> 12) & 63] + "==";
  } else if (n - i === 2) {
    const x = (data[i] << 16) | (data[i + 1] << 8);
    s += A[x >> 18] + A[(x >> 12) & 63] + A[(x >> 6) & 63] + "=";
  }
  parts.push(s);
  return parts.join("");
}

export function b64encodeKind(data, p) {
  return b64encode(data, !!p.urlsafe);
}

const WS = new Set([0x20, 0x09, 0x0a, 0x0d, 0x0c, 0x0b]);

function valueTable(urlsafe) {
  const t = new Int16Array(256).fill(-1);
  const A = urlsafe ? URL : STD;
  for (let i = 0; i < 64; i++) t[A.charCodeAt(i)] = i;
  return t;
}
const TABLES = { false: valueTable(false), true: valueTable(true) };

export function b64decode(data, urlsafe = false) {
  const t = TABLES[urlsafe];
  for (let i = 0; i < data.length; i++) {
    const c = data[i];
    if (t[c] < 0 && c !== 0x3d && !WS.has(c)) {
      throw new Error(`invalid base64 character ${pyBytesRepr([c])} at offset ${i}`);
    }
  }
  const raw = [];
  for (let i = 0; i < data.length; i++) if (!WS.has(data[i])) raw.push(data[i]);
  let end = raw.length;
  while (end > 0 && raw[end - 1] === 0x3d) end--;
  const pad = raw.length - end;
  for (let i = 0; i < end; i++) {
    if (raw[i] === 0x3d) throw new Error("invalid base64: '=' padding in the middle of the input");
  }
  if (pad > 2 || (pad && raw.length % 4)) throw new Error("invalid base64: wrong amount of '=' padding");
  if (end % 4 === 1) throw new Error("invalid base64: input length is one more than a multiple of 4");
  const out = new Uint8Array(Math.floor((end * 3) / 4));
  let o = 0;
  let acc = 0;
  let bits = 0;
  for (let i = 0; i < end; i++) {
    acc = ((acc << 6) | t[raw[i]]) & 0xffffff;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[o++] = (acc >> bits) & 0xff;
    }
  }
  return out.subarray(0, o);
}

export function b64decodeKind(data, p) {
  return b64decode(data, !!p.urlsafe);
}
