// Params validation for the portable kinds, with the messages Python's jsonschema gives
// (run_kind's "<kind>: param 'x': <message>" / "<kind>: params: <message>").
// Only the keywords the built-in params schemas use are implemented.

import { F64 } from "../json.js";
import { cmpCodePoints, pyRepr } from "../util.js";

export function params(props = {}, required = []) {
  return { type: "object", properties: props, required, additionalProperties: false };
}

function isInteger(v) {
  if (typeof v === "bigint") return true;
  if (v instanceof F64) return Number.isInteger(v.v);
  return typeof v === "number" && Number.isInteger(v);
}

function isNumber(v) {
  return typeof v === "number" || typeof v === "bigint" || v instanceof F64;
}

function num(v) {
  return v instanceof F64 ? v.v : v;
}

function isObject(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v) && !(v instanceof F64);
}

function isType(v, t) {
  switch (t) {
    case "object":
      return isObject(v);
    case "array":
      return Array.isArray(v);
    case "string":
      return typeof v === "string";
    case "boolean":
      return typeof v === "boolean";
    case "integer":
      return isInteger(v);
    case "number":
      return isNumber(v);
    case "null":
      return v === null;
    default:
      return false;
  }
}

function lt(a, b) {
  if (typeof a === "bigint" || typeof b === "bigint") return BigInt(num(a)) < BigInt(num(b));
  return num(a) < num(b);
}

function equal(a, b) {
  if (typeof a === "boolean" || typeof b === "boolean") return a === b;
  if (isNumber(a) && isNumber(b)) return !lt(a, b) && !lt(b, a);
  return a === b;
}

function check(schema, v, path, errors) {
  if (schema.type !== undefined) {
    const types = Array.isArray(schema.type) ? schema.type : [schema.type];
    if (!types.some((t) => isType(v, t))) {
      errors.push({ path, message: `${pyRepr(v)} is not of type ${types.map((t) => pyRepr(t)).join(", ")}` });
      return;
    }
  }
  if (schema.enum !== undefined && !schema.enum.some((e) => equal(e, v))) {
    errors.push({ path, message: `${pyRepr(v)} is not one of ${pyRepr(schema.enum)}` });
  }
  if (isNumber(v)) {
    if (schema.minimum !== undefined && lt(v, schema.minimum)) {
      errors.push({ path, message: `${pyRepr(v)} is less than the minimum of ${pyRepr(schema.minimum)}` });
    }
    if (schema.maximum !== undefined && lt(schema.maximum, v)) {
      errors.push({ path, message: `${pyRepr(v)} is greater than the maximum of ${pyRepr(schema.maximum)}` });
    }
  }
  if (typeof v === "string" && schema.minLength !== undefined && [...v].length < schema.minLength) {
    const m = schema.minLength === 1 ? "should be non-empty" : "is too short";
    errors.push({ path, message: `${pyRepr(v)} ${m}` });
  }
  if (Array.isArray(v) && schema.items) {
    v.forEach((item, k) => check(schema.items, item, [...path, k], errors));
  }
  if (isObject(v)) {
    for (const [name, sub] of Object.entries(schema.properties || {})) {
      if (Object.prototype.hasOwnProperty.call(v, name)) check(sub, v[name], [...path, name], errors);
    }
    for (const name of schema.required || []) {
      if (!Object.prototype.hasOwnProperty.call(v, name)) {
        errors.push({ path, message: `${pyRepr(name)} is a required property` });
      }
    }
    if (schema.additionalProperties === false) {
      const extras = Object.keys(v)
        .filter((k) => !Object.prototype.hasOwnProperty.call(schema.properties || {}, k))
        .sort(cmpCodePoints);
      if (extras.length) {
        const verb = extras.length === 1 ? "was" : "were";
        errors.push({
          path,
          message: `Additional properties are not allowed (${extras.map(pyRepr).join(", ")} ${verb} unexpected)`,
        });
      }
    }
  }
}

function cmpPath(a, b) {
  for (let i = 0; i < Math.min(a.length, b.length); i++) {
    const x = a[i];
    const y = b[i];
    if (x === y) continue;
    if (typeof x === "number" && typeof y === "number") return x < y ? -1 : 1;
    return cmpCodePoints(String(x), String(y));
  }
  return a.length - b.length;
}

function paramPath(path) {
  let out = "";
  for (const part of path) {
    out += typeof part === "number" ? `[${part}]` : out ? `.${part}` : String(part);
  }
  return out;
}

// Returns null or the one-line TaskError message.
export function validateParams(kindName, schema, p) {
  if (!isObject(p)) return `${kindName}: params must be a map, got ${Array.isArray(p) ? "list" : typeof p}`;
  if (!schema) return null;
  const errors = [];
  check(schema, p, [], errors);
  if (!errors.length) return null;
  // jsonschema's best_match: the shallowest error, then the greatest path, then the first.
  let best = errors[0];
  for (const e of errors.slice(1)) {
    if (e.path.length < best.path.length) best = e;
    else if (e.path.length === best.path.length && cmpPath(e.path, best.path) > 0) best = e;
  }
  const where = paramPath(best.path);
  return where ? `${kindName}: param ${pyRepr(where)}: ${best.message}` : `${kindName}: params: ${best.message}`;
}
