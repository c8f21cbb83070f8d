// The portable kinds: the subset of node/kinds whose outputs the Worker reproduces bit
// for bit (docs/KINDS.md "Portability contract").

import { F64 } from "../json.js";
import { oneLine } from "../util.js";
import { b64decodeKind, b64encodeKind } from "./base64.js";
import { csvSummaryKind } from "./csv.js";
import { blake2bKind, sha256Kind } from "./hash.js";
import { jsonTransformKind, jsonValidateKind } from "./jsonkinds.js";
import { montecarloKind, statsKind } from "./numeric.js";
import { params } from "./params.js";
import { textStatsKind } from "./text.js";

const URLSAFE = { urlsafe: { type: "boolean", default: false } };

export const KINDS = {
  "hash.sha256": { fn: sha256Kind, schema: params() },
  "hash.blake2b": {
    fn: blake2bKind,
    schema: params({ digest_size: { type: "integer", minimum: 1, maximum: 64, default: 64 } }),
  },
  "base64.encode": { fn: b64encodeKind, schema: params(URLSAFE) },
  "base64.decode": { fn: b64decodeKind, schema: params(URLSAFE) },
  "json.validate": {
    fn: jsonValidateKind,
    schema: params(
      {
        schema: { type: ["object", "boolean"] },
        max_errors: { type: "integer", minimum: 0, maximum: 10000, default: 100 },
      },
      ["schema"],
    ),
  },
  "json.transform": {
    fn: jsonTransformKind,
    schema: params({ expression: { type: "string", minLength: 1 } }, ["expression"]),
  },
  "csv.summary": {
    fn: csvSummaryKind,
    schema: params({ delimiter: { enum: [",", ";", "\t", "|"], default: "," } }),
  },
  "text.stats": { fn: textStatsKind, schema: params() },
  "np.stats": { fn: statsKind, schema: params({ values: { type: "array", items: { type: "number" } } }) },
  "np.montecarlo_pi": {
    fn: montecarloKind,
    schema: params({
      samples: { type: "integer", minimum: 1, maximum: 1000000000, default: 1000000 },
      seed: { type: "integer", minimum: 0, maximum: 18446744073709551615n, default: 0 },
    }),
  },
};
for (const k of Object.values(KINDS)) k.version = "1";

export function portableNames() {
  return Object.keys(KINDS).sort();
}

// Edge limits: the largest input (bytes) each kind runs with inside the Worker's isolate
// (128 MB, CPU time per request); a larger one is queued for pull-mode peers. The kinds
// that parse JSON build an ordered wrapper per object: 1 MiB of `[{},{},...]` takes about
// 150 MB of heap (measured under node), 256 KiB about 40 MB, hence their budget.
// Overridden per kind by the EDGE_INPUT_BYTES var: a JSON object {"kind": bytes, "*": bytes}.
export const EDGE_INPUT_BYTES = {
  "hash.sha256": 4 * 1024 * 1024,
  "hash.blake2b": 4 * 1024 * 1024,
  "base64.encode": 4 * 1024 * 1024,
  "base64.decode": 4 * 1024 * 1024,
  "json.validate": 256 * 1024,
  "json.transform": 256 * 1024,
  "np.stats": 256 * 1024,
  "csv.summary": 1024 * 1024,
  "text.stats": 1024 * 1024,
  "np.montecarlo_pi": 4 * 1024 * 1024,
};

export function edgeInputLimit(name, overrides = {}) {
  const o = overrides[name] ?? overrides["*"];
  return Number.isSafeInteger(o) && o >= 0 ? o : (EDGE_INPUT_BYTES[name] ?? 0);
}

// Why a portable kind's input is too big to run at the edge (null if it is not).
export function whyNotAtEdge(name, inputSize, overrides = {}) {
  const max = edgeInputLimit(name, overrides);
  if (inputSize > max) {
    return `a ${name} input of ${inputSize} bytes exceeds the bridge's edge limit of ${max} bytes for this kind (EDGE_INPUT_BYTES)`;
  }
  return null;
}

// Whether the bridge runs this kind/version itself; `limits` may refuse expensive ones.
export function whyNotPortable(name, version, p, limits = {}) {
  const k = KINDS[name];
  if (!k) return `kind '${name}' is not a portable kind`;
  if (version !== undefined && version !== null && String(version) !== k.version) {
    return `kind '${name}' version '${version}' is not portable (the bridge runs version '${k.version}')`;
  }
  if (name === "np.montecarlo_pi" && limits.maxSamples !== undefined && p && p.samples !== undefined) {
    const s = Number(p.samples instanceof F64 ? p.samples.v : p.samples);
    if (s > limits.maxSamples) {
      return `np.montecarlo_pi with ${s} samples exceeds the bridge's limit of ${limits.maxSamples} (MAX_MC_SAMPLES)`;
    }
  }
  return null;
}

// F64 -> number (params such as 32.0); BigInt kept for the u64 seed.
function params2(v) {
  if (v instanceof F64) return v.v;
  if (Array.isArray(v)) return v.map(params2);
  if (v && typeof v === "object" && typeof v !== "bigint") {
    const o = {};
    for (const k of Object.keys(v)) o[k] = params2(v[k]);
    return o;
  }
  return v;
}

// -> {ok: true, output} | {ok: false, error}
export async function runKind(name, data, p, validate) {
  const k = KINDS[name];
  const msg = validate(name, k.schema, p);
  if (msg) return { ok: false, error: oneLine(msg) };
  const clean = params2(p);
  if (name !== "json.validate" && name !== "np.montecarlo_pi") {
    for (const key of Object.keys(clean)) if (typeof clean[key] === "bigint") clean[key] = Number(clean[key]);
  }
  try {
    return { ok: true, output: await k.fn(data, clean) };
  } catch (e) {
    if (e instanceof RangeError && /call stack|Invalid array length|Invalid string length/i.test(e.message)) {
      return { ok: false, error: oneLine(`${name}: input too large or too deeply nested for the bridge (${e.message})`) };
    }
    return { ok: false, error: oneLine(`${name}: ${e.message || e}`) };
  }
}
