// A JSON Schema validator that reports errors the way Python's jsonschema (4.x)
// iter_errors does: applicators that descend (properties, items, allOf, $ref, if/then/
// else, ...) report the failing leaf keyword at the leaf's instance path; anyOf, oneOf,
// not, contains, unevaluated* report one error at their own keyword. Drafts 4, 6, 7,
// 2019-09 and 2020-12 (the default); `format` is not asserted; only local `$ref`s
// (JSON pointers, $anchor, embedded $id) resolve.

import { cmpCodePoints, codePointLength } from "../util.js";

const DRAFTS = {
  "http://json-schema.org/draft-04/schema": 4,
  "http://json-schema.org/draft-06/schema": 6,
  "http://json-schema.org/draft-07/schema": 7,
  "https://json-schema.org/draft/2019-09/schema": 2019,
  "https://json-schema.org/draft/2020-12/schema": 2020,
};

export class SchemaUnusable extends Error {}

const hasOwn = (o, k) => Object.prototype.hasOwnProperty.call(o, k);

function isObject(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v);
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
    case "null":
      return v === null;
    case "number":
      return typeof v === "number";
    case "integer":
      return typeof v === "number" && Number.isInteger(v);
    default:
      throw new SchemaUnusable(`Unknown type ${JSON.stringify(t)}`);
  }
}

export function equal(a, b) {
  if (a === b) return true;
  if (Array.isArray(a) && Array.isArray(b)) {
    return a.length === b.length && a.every((x, i) => equal(x, b[i]));
  }
  if (isObject(a) && isObject(b)) {
    const ka = Object.keys(a);
    if (ka.length !== Object.keys(b).length) return false;
    return ka.every((k) => hasOwn(b, k) && equal(a[k], b[k]));
  }
  return false;
}

// Python's re.search semantics for the common classes: \d and \w are Unicode-aware.
const regexCache = new Map();
export function pyRegex(pattern) {
  let re = regexCache.get(pattern);
  if (re) return re;
  let out = "";
  let inClass = false;
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i];
    if (c === "\\" && i + 1 < pattern.length) {
      const n = pattern[i + 1];
      i++;
      if (n === "d") out += "\\p{Nd}";
      else if (n === "D") out += inClass ? "\\D" : "\\P{Nd}";
      else if (n === "w") out += inClass ? "\\p{L}\\p{N}_" : "[\\p{L}\\p{N}_]";
      else if (n === "W") out += inClass ? "\\W" : "[^\\p{L}\\p{N}_]";
      else out += "\\" + n;
      continue;
    }
    if (c === "[" && !inClass) inClass = true;
    else if (c === "]" && inClass) inClass = false;
    out += c;
  }
  try {
    re = new RegExp(out, "u");
  } catch {
    try {
      re = new RegExp(pattern);
    } catch (e) {
      throw new SchemaUnusable(`${JSON.stringify(pattern)} is not a valid regex: ${e.message}`);
    }
  }
  regexCache.set(pattern, re);
  return re;
}

function unescapePointer(part) {
  return decodeURIComponent(part).replace(/~1/g, "/").replace(/~0/g, "~");
}

export class Validator {
  constructor(root) {
    this.root = root;
    const uri = isObject(root) && typeof root.$schema === "string" ? root.$schema.replace(/#$/, "") : null;
    this.draft = (uri && DRAFTS[uri]) || 2020;
    this.ids = new Map();
    this.anchors = new Map();
    this.index(root, new Set());
  }

  index(schema, seen) {
    if (!schema || typeof schema !== "object" || seen.has(schema)) return;
    seen.add(schema);
    if (isObject(schema)) {
      if (typeof schema.$id === "string") {
        if (schema.$id.startsWith("#")) this.anchors.set(schema.$id.slice(1), schema);
        else this.ids.set(schema.$id.replace(/#$/, ""), schema);
      }
      if (typeof schema.id === "string" && this.draft === 4) this.ids.set(schema.id.replace(/#$/, ""), schema);
      if (typeof schema.$anchor === "string") this.anchors.set(schema.$anchor, schema);
      if (typeof schema.$dynamicAnchor === "string") this.anchors.set(schema.$dynamicAnchor, schema);
      for (const k of Object.keys(schema)) {
        if (k === "enum" || k === "const") continue;
        this.index(schema[k], seen);
      }
    } else {
      for (const x of schema) this.index(x, seen);
    }
  }

  resolve(ref) {
    const hash = ref.indexOf("#");
    const base = hash < 0 ? ref : ref.slice(0, hash);
    const frag = hash < 0 ? "" : ref.slice(hash + 1);
    let doc = this.root;
    if (base) {
      const rootId = isObject(this.root) && typeof this.root.$id === "string" ? this.root.$id.replace(/#$/, "") : null;
      if (base === rootId) doc = this.root;
      else if (this.ids.has(base)) doc = this.ids.get(base);
      else {
        let found = null;
        if (rootId) {
          try {
            const abs = new URL(base, rootId).href;
            for (const [id, s] of this.ids) {
              try {
                if (new URL(id, rootId).href === abs) found = s;
              } catch {
                /* not a URL */
              }
            }
          } catch {
            /* not a URL */
          }
        }
        if (!found) throw new SchemaUnusable(`Unresolvable: ${ref}`);
        doc = found;
      }
    }
    if (!frag) return doc;
    if (!frag.startsWith("/")) {
      const s = this.anchors.get(frag);
      if (s === undefined) throw new SchemaUnusable(`Unresolvable: ${ref}`);
      return s;
    }
    let cur = doc;
    for (const raw of frag.slice(1).split("/")) {
      const part = unescapePointer(raw);
      if (Array.isArray(cur) && /^(0|[1-9][0-9]*)$/.test(part) && Number(part) < cur.length) cur = cur[Number(part)];
      else if (isObject(cur) && hasOwn(cur, part)) cur = cur[part];
      else throw new SchemaUnusable(`Unresolvable JSON pointer: ${JSON.stringify(frag)}`);
    }
    return cur;
  }

  isValid(instance, schema) {
    return this.iter(instance, schema, []).next().done;
  }

  // yields {path, keyword, value, instance}
  // falsePath: where a `false` schema's error is reported. jsonschema's descend() yields
  // it before adding its path element, so it lands on the parent's path.
  *iter(instance, schema, path, falsePath = path) {
    if (schema === true) return;
    if (schema === false) {
      yield { path: falsePath, keyword: "None", value: null, instance };
      return;
    }
    if (!isObject(schema)) return;
    const legacy = this.draft <= 7;
    const keys = legacy && hasOwn(schema, "$ref") ? ["$ref"] : Object.keys(schema);
    for (const k of keys) {
      const fn = this.keyword(k);
      if (!fn) continue;
      for (const e of fn.call(this, schema[k], instance, schema, path)) {
        if (e.path === undefined) e.path = path;
        if (e.keyword === undefined) {
          e.keyword = k;
          e.value = schema[k];
          e.instance = instance;
        }
        yield e;
      }
    }
  }

  keyword(k) {
    const d = this.draft;
    switch (k) {
      case "$ref":
        return KW._ref;
      case "$dynamicRef":
        return d >= 2020 ? KW._ref : null;
      case "$recursiveRef":
        return d === 2019 ? KW._ref : null;
      case "additionalItems":
        return d <= 2019 ? KW.additionalItems : null;
      case "items":
        return d >= 2020 ? KW.items : KW._itemsLegacy;
      case "prefixItems":
        return d >= 2020 ? KW.prefixItems : null;
      case "contains":
        return d === 4 ? null : d <= 7 ? KW._containsLegacy : KW.contains;
      case "dependencies":
        return d <= 7 ? KW.dependencies : null;
      case "dependentRequired":
      case "dependentSchemas":
      case "unevaluatedItems":
      case "unevaluatedProperties":
        return d >= 2019 ? KW[k] : null;
      case "if":
        return d >= 7 ? KW.if : null;
      case "const":
      case "propertyNames":
      case "exclusiveMaximum":
      case "exclusiveMinimum":
        return d >= 6 ? KW[k] : null;
      case "minimum":
        return d === 4 ? KW._minimum4 : KW.minimum;
      case "maximum":
        return d === 4 ? KW._maximum4 : KW.maximum;
      case "not":
        return KW._not;
      default:
        return !k.startsWith("_") && hasOwn(KW, k) ? KW[k] : null;
    }
  }

  // --- evaluated items/properties for unevaluated* ------------------------------------
  evaluatedKeys(instance, schema) {
    if (!isObject(schema)) return [];
    let keys = [];
    for (const r of ["$ref", "$dynamicRef"]) {
      if (typeof schema[r] === "string") keys = keys.concat(this.evaluatedKeys(instance, this.resolve(schema[r])));
    }
    if (isObject(schema.properties)) {
      for (const k of Object.keys(schema.properties)) if (hasOwn(instance, k)) keys.push(k);
    }
    for (const kw of ["additionalProperties", "unevaluatedProperties"]) {
      if (schema[kw] === undefined) continue;
      for (const k of Object.keys(instance)) if (this.isValid(instance[k], schema[kw])) keys.push(k);
    }
    if (isObject(schema.patternProperties)) {
      for (const k of Object.keys(instance)) {
        for (const p of Object.keys(schema.patternProperties)) if (pyRegex(p).test(k)) keys.push(k);
      }
    }
    if (isObject(schema.dependentSchemas)) {
      for (const [k, sub] of Object.entries(schema.dependentSchemas)) {
        if (hasOwn(instance, k)) keys = keys.concat(this.evaluatedKeys(instance, sub));
      }
    }
    for (const kw of ["allOf", "oneOf", "anyOf"]) {
      for (const sub of schema[kw] || []) {
        if (this.isValid(instance, sub)) keys = keys.concat(this.evaluatedKeys(instance, sub));
      }
    }
    if (schema.if !== undefined) {
      if (this.isValid(instance, schema.if)) {
        keys = keys.concat(this.evaluatedKeys(instance, schema.if));
        if (schema.then !== undefined) keys = keys.concat(this.evaluatedKeys(instance, schema.then));
      } else if (schema.else !== undefined) keys = keys.concat(this.evaluatedKeys(instance, schema.else));
    }
    return keys;
  }

  evaluatedIndexes(instance, schema) {
    if (!isObject(schema)) return [];
    if (schema.items !== undefined) return instance.map((_, i) => i);
    let idx = [];
    for (const r of ["$ref", "$dynamicRef"]) {
      if (typeof schema[r] === "string") idx = idx.concat(this.evaluatedIndexes(instance, this.resolve(schema[r])));
    }
    if (Array.isArray(schema.prefixItems)) idx = idx.concat(schema.prefixItems.map((_, i) => i));
    if (schema.if !== undefined) {
      if (this.isValid(instance, schema.if)) {
        idx = idx.concat(this.evaluatedIndexes(instance, schema.if));
        if (schema.then !== undefined) idx = idx.concat(this.evaluatedIndexes(instance, schema.then));
      } else if (schema.else !== undefined) idx = idx.concat(this.evaluatedIndexes(instance, schema.else));
    }
    for (const kw of ["contains", "unevaluatedItems"]) {
      if (schema[kw] === undefined) continue;
      instance.forEach((v, i) => {
        if (this.isValid(v, schema[kw])) idx.push(i);
      });
    }
    for (const kw of ["allOf", "oneOf", "anyOf"]) {
      for (const sub of schema[kw] || []) {
        if (this.isValid(instance, sub)) idx = idx.concat(this.evaluatedIndexes(instance, sub));
      }
    }
    return idx;
  }
}

function additionalKeys(instance, schema) {
  const props = isObject(schema.properties) ? schema.properties : {};
  const patterns = isObject(schema.patternProperties) ? Object.keys(schema.patternProperties) : [];
  const re = patterns.length ? pyRegex(patterns.join("|")) : null;
  return Object.keys(instance).filter((k) => !hasOwn(props, k) && !(re && re.test(k)));
}

function fail() {
  return {};
}

const KW = {
  *_ref(ref, instance, schema, path) {
    yield* this.iter(instance, this.resolve(ref), path);
  },
  *type(types, instance) {
    const list = Array.isArray(types) ? types : [types];
    if (!list.some((t) => isType(instance, t))) yield fail();
  },
  *enum(values, instance) {
    if (!values.some((e) => equal(e, instance))) yield fail();
  },
  *const(value, instance) {
    if (!equal(value, instance)) yield fail();
  },
  *properties(props, instance, schema, path) {
    if (!isObject(instance)) return;
    for (const k of Object.keys(props)) {
      if (hasOwn(instance, k)) yield* this.iter(instance[k], props[k], [...path, k], path);
    }
  },
  *patternProperties(pp, instance, schema, path) {
    if (!isObject(instance)) return;
    for (const p of Object.keys(pp)) {
      const re = pyRegex(p);
      for (const k of Object.keys(instance)) if (re.test(k)) yield* this.iter(instance[k], pp[p], [...path, k], path);
    }
  },
  *additionalProperties(ap, instance, schema, path) {
    if (!isObject(instance)) return;
    const extras = additionalKeys(instance, schema);
    if (isObject(ap)) {
      for (const k of extras) yield* this.iter(instance[k], ap, [...path, k], path);
    } else if (!ap && extras.length) yield fail();
  },
  *propertyNames(pn, instance, schema, path) {
    if (!isObject(instance)) return;
    for (const k of Object.keys(instance)) yield* this.iter(k, pn, path);
  },
  *required(names, instance) {
    if (!isObject(instance)) return;
    for (const n of names) if (!hasOwn(instance, n)) yield fail();
  },
  *minProperties(n, instance) {
    if (isObject(instance) && Object.keys(instance).length < n) yield fail();
  },
  *maxProperties(n, instance) {
    if (isObject(instance) && Object.keys(instance).length > n) yield fail();
  },
  *dependentRequired(deps, instance) {
    if (!isObject(instance)) return;
    for (const [k, list] of Object.entries(deps)) {
      if (!hasOwn(instance, k)) continue;
      for (const each of list) if (!hasOwn(instance, each)) yield fail();
    }
  },
  *dependentSchemas(deps, instance, schema, path) {
    if (!isObject(instance)) return;
    for (const [k, sub] of Object.entries(deps)) {
      if (hasOwn(instance, k)) yield* this.iter(instance, sub, path);
    }
  },
  *dependencies(deps, instance, schema, path) {
    if (!isObject(instance)) return;
    for (const [k, dep] of Object.entries(deps)) {
      if (!hasOwn(instance, k)) continue;
      if (Array.isArray(dep)) {
        for (const each of dep) if (!hasOwn(instance, each)) yield fail();
      } else yield* this.iter(instance, dep, path);
    }
  },
  *items(items, instance, schema, path) {
    if (!Array.isArray(instance)) return;
    const prefix = Array.isArray(schema.prefixItems) ? schema.prefixItems.length : 0;
    if (instance.length - prefix <= 0) return;
    if (items === false) {
      yield fail();
      return;
    }
    for (let i = prefix; i < instance.length; i++) yield* this.iter(instance[i], items, [...path, i], path);
  },
  *_itemsLegacy(items, instance, schema, path) {
    if (!Array.isArray(instance)) return;
    if (Array.isArray(items)) {
      const n = Math.min(items.length, instance.length);
      for (let i = 0; i < n; i++) yield* this.iter(instance[i], items[i], [...path, i], path);
    } else {
      for (let i = 0; i < instance.length; i++) yield* this.iter(instance[i], items, [...path, i], path);
    }
  },
  *prefixItems(prefix, instance, schema, path) {
    if (!Array.isArray(instance)) return;
    const n = Math.min(prefix.length, instance.length);
    for (let i = 0; i < n; i++) yield* this.iter(instance[i], prefix[i], [...path, i], path);
  },
  *additionalItems(ai, instance, schema, path) {
    if (!Array.isArray(instance) || isObject(schema.items === undefined ? {} : schema.items)) return;
    const n = Array.isArray(schema.items) ? schema.items.length : 0;
    if (isObject(ai)) {
      for (let i = n; i < instance.length; i++) yield* this.iter(instance[i], ai, [...path, i], path);
    } else if (!ai && instance.length > n) yield fail();
  },
  *contains(contains, instance, schema) {
    if (!Array.isArray(instance)) return;
    const minC = schema.minContains === undefined ? 1 : schema.minContains;
    const maxC = schema.maxContains === undefined ? instance.length : schema.maxContains;
    let matches = 0;
    for (const each of instance) {
      if (this.isValid(each, contains)) {
        matches++;
        if (matches > maxC) {
          yield { keyword: "maxContains", value: maxC, instance };
          return;
        }
      }
    }
    if (matches < minC) {
      if (!matches) yield fail();
      else yield { keyword: "minContains", value: minC, instance };
    }
  },
  *_containsLegacy(contains, instance) {
    if (!Array.isArray(instance)) return;
    if (!instance.some((e) => this.isValid(e, contains))) yield fail();
  },
  *minItems(n, instance) {
    if (Array.isArray(instance) && instance.length < n) yield fail();
  },
  *maxItems(n, instance) {
    if (Array.isArray(instance) && instance.length > n) yield fail();
  },
  *uniqueItems(u, instance) {
    if (!u || !Array.isArray(instance)) return;
    for (let i = 0; i < instance.length; i++) {
      for (let j = i + 1; j < instance.length; j++) {
        if (equal(instance[i], instance[j])) {
          yield fail();
          return;
        }
      }
    }
  },
  *minLength(n, instance) {
    if (typeof instance === "string" && codePointLength(instance) < n) yield fail();
  },
  *maxLength(n, instance) {
    if (typeof instance === "string" && codePointLength(instance) > n) yield fail();
  },
  *pattern(p, instance) {
    if (typeof instance === "string" && !pyRegex(p).test(instance)) yield fail();
  },
  *format() {},
  *minimum(m, instance) {
    if (typeof instance === "number" && instance < m) yield fail();
  },
  *maximum(m, instance) {
    if (typeof instance === "number" && instance > m) yield fail();
  },
  *_minimum4(m, instance, schema) {
    if (typeof instance !== "number") return;
    if (schema.exclusiveMinimum ? instance <= m : instance < m) yield fail();
  },
  *_maximum4(m, instance, schema) {
    if (typeof instance !== "number") return;
    if (schema.exclusiveMaximum ? instance >= m : instance > m) yield fail();
  },
  *exclusiveMinimum(m, instance) {
    if (typeof instance === "number" && instance <= m) yield fail();
  },
  *exclusiveMaximum(m, instance) {
    if (typeof instance === "number" && instance >= m) yield fail();
  },
  *multipleOf(d, instance) {
    if (typeof instance !== "number") return;
    let failed;
    if (Number.isInteger(d)) failed = instance % d !== 0;
    else {
      const q = instance / d;
      failed = !Number.isFinite(q) || Math.trunc(q) !== q;
    }
    if (failed) yield fail();
  },
  *allOf(list, instance, schema, path) {
    for (const sub of list) yield* this.iter(instance, sub, path);
  },
  *anyOf(list, instance) {
    for (const sub of list) if (this.isValid(instance, sub)) return;
    yield fail();
  },
  *oneOf(list, instance) {
    let k = 0;
    for (; k < list.length; k++) if (this.isValid(instance, list[k])) break;
    if (k === list.length) {
      yield fail();
      return;
    }
    for (let j = k + 1; j < list.length; j++) {
      if (this.isValid(instance, list[j])) {
        yield fail();
        return;
      }
    }
  },
  *_not(sub, instance) {
    if (this.isValid(instance, sub)) yield fail();
  },
  *if(cond, instance, schema, path) {
    if (this.isValid(instance, cond)) {
      if (schema.then !== undefined) yield* this.iter(instance, schema.then, path);
    } else if (schema.else !== undefined) yield* this.iter(instance, schema.else, path);
  },
  *unevaluatedItems(ui, instance, schema) {
    if (!Array.isArray(instance)) return;
    const seen = new Set(this.evaluatedIndexes(instance, schema));
    if (instance.some((_, i) => !seen.has(i))) yield fail();
  },
  *unevaluatedProperties(up, instance, schema, path) {
    if (!isObject(instance)) return;
    const seen = new Set(this.evaluatedKeys(instance, schema));
    for (const k of Object.keys(instance)) {
      if (seen.has(k)) continue;
      if (!this.iter(instance[k], up, [...path, k]).next().done) {
        yield fail();
        return;
      }
    }
  },
};

export function jsonPointer(path) {
  return path.map((p) => "/" + String(p).replace(/~/g, "~0").replace(/\//g, "~1")).join("");
}

export { cmpCodePoints };
