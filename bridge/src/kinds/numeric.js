// np.stats and np.montecarlo_pi, operation for operation as docs/KINDS.md specifies.

import { F64 } from "../json.js";
import { pyRepr } from "../util.js";
import { parsePyJSON } from "./jsonkinds.js";

function isBlank(data) {
  for (const b of data) {
    if (!(b === 0x20 || (b >= 0x09 && b <= 0x0d))) return false;
  }
  return true;
}

function numbers(value, name) {
  if (!Array.isArray(value)) throw new Error(`${name} must be an array of numbers`);
  value.forEach((v, i) => {
    if (typeof v !== "number" && !(v instanceof F64)) {
      throw new Error(`${name}[${i}] is not a number: ${pyRepr(v)}`.slice(0, 200));
    }
  });
  return value.map((v) => (v instanceof F64 ? v.v : v));
}

export function quantileSorted(s, q) {
  const h = (s.length - 1) * q;
  const i = Math.floor(h);
  const f = h - i;
  return f === 0 ? s[i] : s[i] + f * (s[i + 1] - s[i]);
}

export function describe(values) {
  const x = values.map((v) => v + 0);
  const n = x.length;
  let total = 0;
  for (const v of x) total += v;
  const mean = total / n;
  let m2 = 0;
  for (const v of x) {
    const d = v - mean;
    m2 += d * d;
  }
  const std = Math.sqrt(m2 / n);
  const s = Float64Array.from(x).sort();
  return new Map([
    ["count", n],
    ["sum", new F64(total)],
    ["mean", new F64(mean)],
    ["std", new F64(std)],
    ["min", new F64(s[0])],
    ["max", new F64(s[n - 1])],
    ["median", new F64(quantileSorted(s, 0.5))],
    ["p25", new F64(quantileSorted(s, 0.25))],
    ["p75", new F64(quantileSorted(s, 0.75))],
  ]);
}

export function statsKind(data, p) {
  let values;
  if (!isBlank(data)) {
    if (p.values !== undefined) throw new Error("give values either in the input or as a param, not both");
    values = numbers(parsePyJSON(data), "input");
  } else if (p.values !== undefined) {
    values = numbers(p.values, "values");
  } else {
    throw new Error("give the numbers as a JSON array input or as param 'values'");
  }
  if (!values.length) throw new Error("values must not be empty");
  return describe(values);
}

// --- splitmix64 with 32-bit halves -------------------------------------------------
// (u64 as [hi, lo] uint32 pairs; every step wraps mod 2^64 exactly like the BigInt form
// in the docs, which test/kinds.test.js checks against.)

// (hi, lo) of the low 64 bits of a*b, left in MH/ML (no allocation in the hot loop)
let MH = 0;
let ML = 0;
function mulLo64(ah, al, bh, bl) {
  const a0 = al & 0xffff;
  const a1 = al >>> 16;
  const b0 = bl & 0xffff;
  const b1 = bl >>> 16;
  const p00 = a0 * b0;
  const p01 = a0 * b1;
  const p10 = a1 * b0;
  const p11 = a1 * b1;
  const mid = (p00 >>> 16) + (p01 & 0xffff) + (p10 & 0xffff);
  ML = (((mid & 0xffff) << 16) | (p00 & 0xffff)) >>> 0;
  const carry = p11 + (p01 >>> 16) + (p10 >>> 16) + Math.floor(mid / 65536);
  MH = (carry + Math.imul(ah, bl) + Math.imul(al, bh)) >>> 0;
}

const GAMMA_H = 0x9e3779b9, GAMMA_L = 0x7f4a7c15;
const M1_H = 0xbf58476d, M1_L = 0x1ce4e5b9;
const M2_H = 0x94d049bb, M2_L = 0x133111eb;
const TWO53 = 2 ** -53;

// splitmix64(seed): a function returning outputs 0, 1, 2, ... as [hi, lo] uint32 pairs.
// z = seed + k*GAMMA for k = 1, 2, ... is kept as a running 64-bit sum.
export function splitmix64(seed) {
  const gen = splitmixCore(seed);
  return () => {
    gen.step();
    return [gen.h, gen.l];
  };
}

function splitmixCore(seed) {
  const s = BigInt.asUintN(64, BigInt(seed));
  let zh = Number(s >> 32n) >>> 0;
  let zl = Number(s & 0xffffffffn) >>> 0;
  const g = {
    h: 0,
    l: 0,
    step() {
      const sum = zl + GAMMA_L;
      zh = (zh + GAMMA_H + (sum > 0xffffffff ? 1 : 0)) >>> 0;
      zl = sum >>> 0;
      let h = zh;
      let lo = zl;
      lo = (lo ^ ((lo >>> 30) | (h << 2))) >>> 0; // z ^= z >> 30
      h = (h ^ (h >>> 30)) >>> 0;
      mulLo64(h, lo, M1_H, M1_L); // z *= M1
      h = MH;
      lo = ML;
      lo = (lo ^ ((lo >>> 27) | (h << 5))) >>> 0; // z ^= z >> 27
      h = (h ^ (h >>> 27)) >>> 0;
      mulLo64(h, lo, M2_H, M2_L); // z *= M2
      h = MH;
      lo = ML;
      g.l = (lo ^ ((lo >>> 31) | (h << 1))) >>> 0; // z ^= z >> 31
      g.h = (h ^ (h >>> 31)) >>> 0;
    },
  };
  return g;
}

export function uniform01(h, lo) {
  // (u >> 11) * 2^-53, u >> 11 = h * 2^21 + (lo >>> 11), exact below 2^53
  return (h * 2097152 + (lo >>> 11)) * TWO53;
}

export function montecarloKind(data, p) {
  const samples = p.samples === undefined ? 1000000 : Number(p.samples);
  const g = splitmixCore(p.seed === undefined ? 0 : p.seed);
  let inside = 0;
  for (let j = 0; j < samples; j++) {
    g.step();
    const x = (g.h * 2097152 + (g.l >>> 11)) * TWO53;
    g.step();
    const y = (g.h * 2097152 + (g.l >>> 11)) * TWO53;
    if (x * x + y * y < 1.0) inside++;
  }
  return new Map([
    ["pi", new F64((4 * inside) / samples)],
    ["inside", inside],
    ["samples", samples],
  ]);
}
