// Small helpers shared by the router, the queue and the kinds.

export class TaskError extends Error {}

export function hex(bytes) {
  const b = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  let s = "";
  for (let i = 0; i < b.length; i++) s += (b[i] < 16 ? "0" : "") + b[i].toString(16);
  return s;
}

export function fromHex(text) {
  if (typeof text !== "string" || text.length % 2 || /[^0-9a-fA-F]/.test(text)) return null;
  const out = new Uint8Array(text.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(text.substr(i * 2, 2), 16);
  return out;
}

export async function sha256(data) {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

export async function sha256Hex(data) {
  return hex(await sha256(data));
}

// Python's repr() for the simple values that appear in error messages.
export function pyRepr(v) {
  if (v === null || v === undefined) return "None";
  if (v === true) return "True";
  if (v === false) return "False";
  if (typeof v === "bigint") return v.toString();
  if (typeof v === "number") return pyFloatOrInt(v);
  if (typeof v === "string") return pyStrRepr(v);
  if (Array.isArray(v)) return "[" + v.map(pyRepr).join(", ") + "]";
  if (typeof v === "object" && v.constructor && v.constructor.name === "F64") return pyFloatRepr(v.v);
  if (typeof v === "object") {
    return "{" + Object.keys(v).map((k) => pyStrRepr(k) + ": " + pyRepr(v[k])).join(", ") + "}";
  }
  return String(v);
}

function pyFloatOrInt(v) {
  return Number.isSafeInteger(v) ? String(v) : pyFloatRepr(v);
}

export function pyFloatRepr(v) {
  if (Number.isNaN(v)) return "nan";
  if (v === Infinity) return "inf";
  if (v === -Infinity) return "-inf";
  if (Object.is(v, -0)) return "-0.0";
  // repr uses the shortest digits, like JS, but switches to exponent form at 1e16 and
  // below 1e-4 and writes two-digit exponents.
  const abs = Math.abs(v);
  if (abs !== 0 && (abs >= 1e16 || abs < 1e-4)) {
    let [m, e] = v.toExponential().split("e");
    const sign = e[0] === "-" ? "-" : "+";
    e = e.replace(/^[+-]/, "");
    if (e.length < 2) e = "0" + e;
    return `${m}e${sign}${e}`;
  }
  const s = String(v);
  return /[.e]/.test(s) ? s : s + ".0";
}

export function pyStrRepr(s) {
  const quote = s.includes("'") && !s.includes('"') ? '"' : "'";
  let out = quote;
  for (const ch of s) {
    const c = ch.codePointAt(0);
    if (ch === quote || ch === "\\") out += "\\" + ch;
    else if (ch === "\n") out += "\\n";
    else if (ch === "\r") out += "\\r";
    else if (ch === "\t") out += "\\t";
    else if (c < 0x20 || c === 0x7f) out += "\\x" + c.toString(16).padStart(2, "0");
    else if (c >= 0x80 && !isPrintable(ch)) {
      if (c <= 0xff) out += "\\x" + c.toString(16).padStart(2, "0");
      else if (c <= 0xffff) out += "\\u" + c.toString(16).padStart(4, "0");
      else out += "\\U" + c.toString(16).padStart(8, "0");
    } else out += ch;
  }
  return out + quote;
}

function isPrintable(ch) {
  // Python's str.isprintable: not in categories Cc, Cf, Cs, Co, Cn, Zl, Zp, Zs (except ' ').
  return !/[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}\p{Zs}]/u.test(ch);
}

// Python's repr() of a bytes object of length 1.
export function pyBytesRepr(bytes) {
  let s = "";
  let hasSingle = false;
  let hasDouble = false;
  for (const b of bytes) {
    if (b === 0x27) hasSingle = true;
    if (b === 0x22) hasDouble = true;
  }
  const quote = hasSingle && !hasDouble ? '"' : "'";
  for (const b of bytes) {
    if (b === quote.charCodeAt(0) || b === 0x5c) s += "\\" + String.fromCharCode(b);
    else if (b === 9) s += "\\t";
    else if (b === 10) s += "\\n";
    else if (b === 13) s += "\\r";
    else if (b < 0x20 || b >= 0x7f) s += "\\x" + b.toString(16).padStart(2, "0");
    else s += String.fromCharCode(b);
  }
  return "b" + quote + s + quote;
}

// Strict UTF-8 decoding with CPython's error reasons:
// returns {text} or {reason, start}. `start` is the byte offset of the bad sequence.
const fatalDecoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

export function decodeUTF8(bytes) {
  try {
    return { text: fatalDecoder.decode(bytes) };
  } catch {
    return locateUTF8Error(bytes);
  }
}

function locateUTF8Error(b) {
  let i = 0;
  const n = b.length;
  while (i < n) {
    const c = b[i];
    if (c < 0x80) {
      i++;
      continue;
    }
    let need;
    let lo = 0x80;
    let hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) need = 1;
    else if (c >= 0xe0 && c <= 0xef) {
      need = 2;
      if (c === 0xe0) lo = 0xa0;
      if (c === 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      need = 3;
      if (c === 0xf0) lo = 0x90;
      if (c === 0xf4) hi = 0x8f;
    } else return { reason: "invalid start byte", start: i };
    for (let k = 1; k <= need; k++) {
      if (i + k >= n) return { reason: "unexpected end of data", start: i };
      const d = b[i + k];
      const l = k === 1 ? lo : 0x80;
      const h = k === 1 ? hi : 0xbf;
      if (d < l || d > h) return { reason: "invalid continuation byte", start: i };
    }
    i += need + 1;
  }
  return { reason: "invalid start byte", start: 0 };
}

// Python's `data.decode("utf-8-sig")`: one leading BOM dropped; error offsets are then
// relative to the data after the BOM, as CPython reports them.
export function decodeUTF8Sig(bytes) {
  const hasBom = bytes.length >= 3 && bytes[0] === 0xef && bytes[1] === 0xbb && bytes[2] === 0xbf;
  return decodeUTF8(hasBom ? bytes.subarray(3) : bytes);
}

// Code point comparison (JS's < compares UTF-16 code units).
export function cmpCodePoints(a, b) {
  if (a === b) return 0;
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    const x = a.charCodeAt(i);
    const y = b.charCodeAt(i);
    if (x !== y) {
      const xs = x >= 0xd800 && x <= 0xdfff;
      const ys = y >= 0xd800 && y <= 0xdfff;
      if (xs !== ys) return xs ? 1 : -1; // a surrogate stands for a code point > 0xFFFF
      return x < y ? -1 : 1;
    }
  }
  return a.length < b.length ? -1 : a.length > b.length ? 1 : 0;
}

export function codePointLength(s) {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) {
      const d = s.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) i++;
    }
    n++;
  }
  return n;
}

export function oneLine(text, max = 300) {
  const t = String(text).split(/\s+/).filter(Boolean).join(" ");
  return t.length <= max ? t : t.slice(0, max - 3) + "...";
}
