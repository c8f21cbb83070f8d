// json.validate and json.transform, plus the strict JSON input reader they share with
// np.stats (node/kinds/basic.py parse_json: UTF-8 with optional BOM, Python's json
// grammar and messages, NaN/Infinity rejected, big integers as doubles).

import { canonicalJSON, JSONDecodeError, parseJSON, plain } from "../json.js";
import { cmpCodePoints, decodeUTF8Sig } from "../util.js";
import jmespath from "../vendor/jmespath.js";
import { jsonPointer, SchemaUnusable, Validator } from "./jsonschema.js";

export function parsePyJSON(data, what = "input") {
  const d = decodeUTF8Sig(data);
  if (d.text === undefined) throw new Error(`${what} is not valid UTF-8: ${d.reason} at byte ${d.start}`);
  try {
    return parseJSON(d.text, { ordered: true, intOverflow: true });
  } catch (e) {
    if (e instanceof JSONDecodeError) throw new Error(`${what} is not valid JSON: ${e.message}`);
    if (e && e.intOverflow) throw new Error(`${what} has an integer too large for a double`);
    throw e;
  }
}

const QUOTED = new Set([
  "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
  "exclusiveMinimum", "maxLength", "minLength", "pattern", "format", "maxItems",
  "minItems", "uniqueItems", "maxContains", "minContains", "maxProperties",
  "minProperties", "additionalProperties", "unevaluatedProperties", "items",
  "unevaluatedItems", "dependentRequired",
]);

function isDict(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

export function jsonValidateKind(data, p) {
  const schema = plain(p.schema);
  const instance = parsePyJSON(data);
  const maxErrors = p.max_errors === undefined ? 100 : Number(p.max_errors);
  const seen = new Map();
  try {
    const v = new Validator(schema);
    for (const err of v.iter(instance, schema, [])) {
      const path = jsonPointer(err.path);
      const keyword = err.keyword;
      if (keyword === "required" && isDict(err.instance)) {
        for (const name of err.value) {
          if (!Object.prototype.hasOwnProperty.call(err.instance, name)) {
            const message = `missing required property ${canonicalJSON(name)}`;
            seen.set(JSON.stringify([path, keyword, message]), [path, keyword, message]);
          }
        }
        continue;
      }
      const message =
        QUOTED.has(keyword) && !isDict(err.value) ? `failed ${keyword}: ${canonicalJSON(err.value)}` : `failed ${keyword}`;
      seen.set(JSON.stringify([path, keyword, message]), [path, keyword, message]);
    }
  } catch (e) {
    if (e instanceof SchemaUnusable) throw new Error(`param 'schema' cannot be used: ${e.message}`);
    throw e;
  }
  const cmp = (a, b) => cmpCodePoints(a[0], b[0]) || cmpCodePoints(a[1], b[1]) || cmpCodePoints(a[2], b[2]);
  const ordered = [...seen.values()].sort(cmp).slice(0, maxErrors);
  return new Map([
    ["valid", seen.size === 0],
    [
      "errors",
      ordered.map(
        ([path, keyword, message]) =>
          new Map([
            ["path", path],
            ["keyword", keyword],
            ["message", message],
          ]),
      ),
    ],
  ]);
}

const compiled = new Map();

export function jsonTransformKind(data, p) {
  const document = parsePyJSON(data);
  let ast = compiled.get(p.expression);
  if (ast === undefined) {
    try {
      jmespath.compile(p.expression);
    } catch (e) {
      const first = String(e.message || e).split("\n")[0] || "syntax error";
      throw new Error(`param 'expression' is not valid JMESPath: ${first}`);
    }
    ast = p.expression;
    if (compiled.size > 256) compiled.clear();
    compiled.set(p.expression, ast);
  }
  try {
    return jmespath.search(document, p.expression);
  } catch (e) {
    if (e instanceof TypeError && /not supported between/.test(e.message)) throw e;
    throw new Error(`expression failed: ${e.message || e}`);
  }
}
