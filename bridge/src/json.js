// JSON in and out with the number and key-order rules of docs/KINDS.md.
//
// * `parseJSON(text, opts)` mirrors CPython's json module (the C scanner): the same
//   accepted grammar and the same error messages ("Expecting value: line 1 column 1
//   (char 0)"), positions counted in code points. Objects keep insertion order even for
//   integer-like keys (see `orderedObject`).
// * `stringify(value)` writes compact JSON where a number is an int iff it is a safe
//   integer, `F64` values are always written as floats ("2.0"), `Raw` is spliced in
//   verbatim, `Uint8Array` becomes {"$base64": ...} and `Map`s keep their order.

export class F64 {
  constructor(v) {
    this.v = v;
  }
}

export class Raw {
  constructor(text) {
    this.text = text;
  }
}

export class JSONDecodeError extends Error {}

// A plain-looking object whose Object.keys() order is insertion order, also for keys
// such as "2024" that ordinary objects move to the front.
export function orderedObject() {
  const keys = [];
  const target = {};
  const handler = {
    ownKeys: () => keys.slice(),
    set(t, key, value) {
      if (!Object.prototype.hasOwnProperty.call(t, key)) keys.push(key);
      Object.defineProperty(t, key, { value, writable: true, enumerable: true, configurable: true });
      return true;
    },
    defineProperty(t, key, desc) {
      if (!Object.prototype.hasOwnProperty.call(t, key)) keys.push(key);
      return Reflect.defineProperty(t, key, desc);
    },
    deleteProperty(t, key) {
      const i = keys.indexOf(key);
      if (i >= 0) keys.splice(i, 1);
      return Reflect.deleteProperty(t, key);
    },
  };
  return new Proxy(target, handler);
}

function codePointIndex(text, unitIndex) {
  let n = 0;
  for (let i = 0; i < unitIndex; i++) {
    const c = text.charCodeAt(i);
    if (c >= 0xd800 && c <= 0xdbff && i + 1 < unitIndex) {
      const d = text.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) i++;
    }
    n++;
  }
  return n;
}

function decodeError(msg, text, unitPos) {
  const pos = codePointIndex(text, unitPos);
  const before = text.slice(0, unitPos);
  const lineno = before.split("\n").length;
  const nl = before.lastIndexOf("\n");
  const colno = nl < 0 ? pos + 1 : pos - codePointIndex(text, nl);
  return new JSONDecodeError(`${msg}: line ${lineno} column ${colno} (char ${pos})`);
}

const MAX_SAFE = Number.MAX_SAFE_INTEGER;

function isDigit(c) {
  return c >= 48 && c <= 57;
}

// opts.ordered: objects from orderedObject() (default true)
// opts.lossless: integral float literals become F64, integers beyond 2^53-1 BigInt
// opts.constants: (name) => value for NaN/Infinity/-Infinity; default throws ValueError-like
export function parseJSON(text, opts = {}) {
  const ordered = opts.ordered !== false;
  const lossless = !!opts.lossless;
  const constant =
    opts.constant ||
    ((name) => {
      throw new Error(`${name} is not valid JSON`);
    });
  const len = text.length;
  let i = 0;

  if (len > 0 && text.charCodeAt(0) === 0xfeff) {
    throw decodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0);
  }

  const ws = () => {
    while (i < len) {
      const c = text.charCodeAt(i);
      if (c === 32 || c === 9 || c === 10 || c === 13) i++;
      else break;
    }
  };

  const STOP = {};
  let stopAt = 0;
  const stop = (at) => {
    stopAt = at;
    throw STOP;
  };

  const hex4 = (at) => {
    let v = 0;
    for (let k = 0; k < 4; k++) {
      const c = text.charCodeAt(at + k);
      let d;
      if (c >= 48 && c <= 57) d = c - 48;
      else if (c >= 97 && c <= 102) d = c - 87;
      else if (c >= 65 && c <= 70) d = c - 55;
      else return -1;
      v = v * 16 + d;
    }
    return v;
  };

  // i points just after the opening quote
  const scanString = () => {
    const begin = i - 1;
    let out = "";
    let chunkStart = i;
    for (;;) {
      let c;
      while (i < len) {
        c = text.charCodeAt(i);
        if (c === 34 || c === 92) break;
        if (c <= 0x1f) throw decodeError("Invalid control character at", text, i);
        i++;
      }
      if (i >= len) throw decodeError("Unterminated string starting at", text, begin);
      out += text.slice(chunkStart, i);
      if (c === 34) {
        i++;
        return out;
      }
      // backslash
      i++;
      if (i >= len) throw decodeError("Unterminated string starting at", text, begin);
      const e = text.charCodeAt(i);
      if (e !== 117) {
        const map = { 34: '"', 92: "\\", 47: "/", 98: "\b", 102: "\f", 110: "\n", 114: "\r", 116: "\t" };
        const ch = map[e];
        if (ch === undefined) throw decodeError("Invalid \\escape", text, i - 1);
        out += ch;
        i++;
      } else {
        const uPos = i;
        const start = i + 1;
        const end = start + 4;
        if (end >= len) throw decodeError("Invalid \\uXXXX escape", text, uPos);
        let v = hex4(start);
        if (v < 0) throw decodeError("Invalid \\uXXXX escape", text, uPos);
        let next = end;
        if (v >= 0xd800 && v <= 0xdbff && end + 6 < len && text.charCodeAt(end) === 92 && text.charCodeAt(end + 1) === 117) {
          const w = hex4(end + 2);
          if (w < 0) throw decodeError("Invalid \\uXXXX escape", text, end + 1);
          if (w >= 0xdc00 && w <= 0xdfff) {
            out += String.fromCharCode(v, w);
            v = -1;
            next = end + 6;
          }
        }
        if (v >= 0) out += String.fromCharCode(v);
        i = next;
      }
      chunkStart = i;
    }
  };

  const scanNumber = () => {
    const start = i;
    let j = i;
    if (text.charCodeAt(j) === 45) {
      j++;
      if (j >= len) stop(start);
    }
    const c = text.charCodeAt(j);
    if (c >= 49 && c <= 57) {
      j++;
      while (j < len && isDigit(text.charCodeAt(j))) j++;
    } else if (c === 48) {
      j++;
    } else {
      stop(start);
    }
    let isFloat = false;
    if (j < len - 1 && text.charCodeAt(j) === 46 && isDigit(text.charCodeAt(j + 1))) {
      isFloat = true;
      j += 2;
      while (j < len && isDigit(text.charCodeAt(j))) j++;
    }
    if (j < len - 1 && (text.charCodeAt(j) === 101 || text.charCodeAt(j) === 69)) {
      const eStart = j;
      j++;
      if (j < len - 1 && (text.charCodeAt(j) === 43 || text.charCodeAt(j) === 45)) j++;
      while (j < len && isDigit(text.charCodeAt(j))) j++;
      if (isDigit(text.charCodeAt(j - 1))) isFloat = true;
      else j = eStart;
    }
    const token = text.slice(start, j);
    i = j;
    const v = Number(token);
    if (isFloat) {
      if (lossless && Number.isInteger(v)) return new F64(v);
      return v;
    }
    if (opts.intOverflow) {
      const digits = token.replace("-", "").length;
      if (digits > 4300) {
        throw new Error(
          `Exceeds the limit (4300 digits) for integer string conversion: value has ${digits} digits; use sys.set_int_max_str_digits() to increase the limit`,
        );
      }
      if (!Number.isFinite(v)) {
        const e = new Error("integer too large for a double");
        e.intOverflow = true;
        throw e;
      }
    }
    if (v === 0) return 0; // Python's int("-0") is 0
    if (Number.isSafeInteger(v)) return v;
    if (lossless) {
      const big = BigInt(token);
      if (big >= -BigInt(MAX_SAFE) && big <= BigInt(MAX_SAFE)) return Number(big);
      return big;
    }
    return v;
  };

  const scanOnce = () => {
    if (i >= len) stop(i);
    const c = text.charCodeAt(i);
    switch (c) {
      case 34:
        i++;
        return scanString();
      case 123:
        return scanObject();
      case 91:
        return scanArray();
      case 110:
        if (text.startsWith("null", i)) {
          i += 4;
          return null;
        }
        break;
      case 116:
        if (text.startsWith("true", i)) {
          i += 4;
          return true;
        }
        break;
      case 102:
        if (text.startsWith("false", i)) {
          i += 5;
          return false;
        }
        break;
      case 78:
        if (text.startsWith("NaN", i)) {
          i += 3;
          return constant("NaN");
        }
        break;
      case 73:
        if (text.startsWith("Infinity", i)) {
          i += 8;
          return constant("Infinity");
        }
        break;
      case 45:
        if (text.startsWith("-Infinity", i)) {
          i += 9;
          return constant("-Infinity");
        }
        break;
      default:
        break;
    }
    return scanNumber();
  };

  const scanObject = () => {
    i++;
    const obj = ordered ? orderedObject() : {};
    ws();
    if (i < len && text.charCodeAt(i) === 125) {
      i++;
      return obj;
    }
    for (;;) {
      if (i >= len || text.charCodeAt(i) !== 34) {
        throw decodeError("Expecting property name enclosed in double quotes", text, i);
      }
      i++;
      const key = scanString();
      ws();
      if (i >= len || text.charCodeAt(i) !== 58) throw decodeError("Expecting ':' delimiter", text, i);
      i++;
      ws();
      const value = scanOnce();
      if (ordered) obj[key] = value;
      else Object.defineProperty(obj, key, { value, writable: true, enumerable: true, configurable: true });
      ws();
      if (i < len && text.charCodeAt(i) === 125) {
        i++;
        return obj;
      }
      if (i >= len || text.charCodeAt(i) !== 44) throw decodeError("Expecting ',' delimiter", text, i);
      i++;
      ws();
    }
  };

  const scanArray = () => {
    i++;
    const arr = [];
    ws();
    if (i < len && text.charCodeAt(i) === 93) {
      i++;
      return arr;
    }
    for (;;) {
      arr.push(scanOnce());
      ws();
      if (i < len && text.charCodeAt(i) === 93) {
        i++;
        return arr;
      }
      if (i >= len || text.charCodeAt(i) !== 44) throw decodeError("Expecting ',' delimiter", text, i);
      i++;
      ws();
    }
  };

  let value;
  try {
    ws();
    value = scanOnce();
  } catch (e) {
    if (e === STOP) throw decodeError("Expecting value", text, stopAt);
    throw e;
  }
  ws();
  if (i !== len) throw decodeError("Extra data", text, i);
  return value;
}

// ECMAScript Number::toString is what Python's js_number_str reproduces.
// Non-finite values are written as Python's json.dumps writes them (Infinity, NaN).
function floatText(v) {
  if (Number.isNaN(v)) return "NaN";
  if (!Number.isFinite(v)) return v > 0 ? "Infinity" : "-Infinity";
  if (Object.is(v, -0)) return "-0.0";
  const s = String(v);
  return /[.eE]/.test(s) ? s : s + ".0";
}

function numberText(v) {
  if (Number.isSafeInteger(v)) return String(v);
  return floatText(v);
}

export function bytesToBase64(bytes) {
  let s = "";
  const CH = 0x8000;
  for (let k = 0; k < bytes.length; k += CH) {
    s += String.fromCharCode.apply(null, bytes.subarray(k, k + CH));
  }
  return btoa(s);
}

export function stringify(value) {
  const out = [];
  const write = (v) => {
    if (v === null || v === undefined) {
      out.push("null");
    } else if (typeof v === "boolean") {
      out.push(v ? "true" : "false");
    } else if (typeof v === "number") {
      out.push(numberText(v));
    } else if (typeof v === "bigint") {
      out.push(v.toString());
    } else if (typeof v === "string") {
      out.push(JSON.stringify(v));
    } else if (v instanceof F64) {
      out.push(floatText(v.v));
    } else if (v instanceof Raw) {
      out.push(v.text);
    } else if (v instanceof Uint8Array) {
      out.push('{"$base64":' + JSON.stringify(bytesToBase64(v)) + "}");
    } else if (Array.isArray(v)) {
      out.push("[");
      for (let k = 0; k < v.length; k++) {
        if (k) out.push(",");
        write(v[k]);
      }
      out.push("]");
    } else if (v instanceof Map) {
      out.push("{");
      let first = true;
      for (const [k, x] of v) {
        if (!first) out.push(",");
        first = false;
        out.push(JSON.stringify(String(k)), ":");
        write(x);
      }
      out.push("}");
    } else if (typeof v === "object") {
      out.push("{");
      let first = true;
      for (const k of Object.keys(v)) {
        if (v[k] === undefined) continue;
        if (!first) out.push(",");
        first = false;
        out.push(JSON.stringify(k), ":");
        write(v[k]);
      }
      out.push("}");
    } else {
      throw new TypeError(`cannot encode ${typeof v} as JSON`);
    }
  };
  write(value);
  return out.join("");
}

// JSON.stringify as the docs' canonical_json: compact, keys in order, numbers as JS.
export function canonicalJSON(value) {
  return JSON.stringify(plain(value));
}

// Replace F64/BigInt/ordered proxies with plain JS values (F64 -> number).
export function plain(v) {
  if (v instanceof F64) return v.v;
  if (typeof v === "bigint") return Number(v);
  if (Array.isArray(v)) return v.map(plain);
  if (v instanceof Map) {
    const o = {};
    for (const [k, x] of v) o[k] = plain(x);
    return o;
  }
  if (v && typeof v === "object" && !(v instanceof Uint8Array)) {
    const o = orderedObject();
    for (const k of Object.keys(v)) o[k] = plain(v[k]);
    return o;
  }
  return v;
}

// Sorted-keys canonical form for cache keys (stable whatever the client's key order).
export function sortedJSON(v) {
  if (v instanceof F64) return floatText(v.v);
  if (typeof v === "bigint") return v.toString();
  if (typeof v === "number") return numberText(v);
  if (v === null || typeof v !== "object") return JSON.stringify(v);
  if (Array.isArray(v)) return "[" + v.map(sortedJSON).join(",") + "]";
  const keys = Object.keys(v).sort();
  return "{" + keys.map((k) => JSON.stringify(k) + ":" + sortedJSON(v[k])).join(",") + "}";
}
