import { describe, expect, it } from "vitest";
import { F64, parseJSON, stringify } from "../src/json.js";
import { KINDS, runKind } from "../src/kinds/index.js";
import { validateParams } from "../src/kinds/params.js";
import { splitmix64 } from "../src/kinds/numeric.js";
import { pyFloatRepr } from "../src/util.js";

const enc = (s) => new TextEncoder().encode(s);
const run = async (kind, input, params = {}) => {
  const r = await runKind(kind, typeof input === "string" ? enc(input) : input, params, validateParams);
  return r.ok ? { ok: true, json: stringify(r.output) } : r;
};

describe("portable kinds (docs/KINDS.md examples)", () => {
  it("hash.sha256", async () => {
    expect((await run("hash.sha256", "abc")).json).toBe(
      '"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"',
    );
  });
  it("hash.blake2b RFC 7693 vector and digest_size", async () => {
    expect((await run("hash.blake2b", "abc")).json).toBe(
      '"ba80a53f981c4d0d6a2797b69f12f6e94c212f14685ac4b74b12bb6fdbffa2d17d87c5392aab792dc252d5de4533cc9518d38aa8dbf1925ab92386edd4009923"',
    );
    expect((await run("hash.blake2b", "", { digest_size: 32 })).json).toBe(
      '"0e5751c026e543b2e8ab2eb06099daa1d1e5df47778f7787faab45cdf12fe3a8"',
    );
    expect(await run("hash.blake2b", "abc", { digest_size: 100 })).toEqual({
      ok: false,
      error: "hash.blake2b: param 'digest_size': 100 is greater than the maximum of 64",
    });
  });
  it("base64", async () => {
    expect((await run("base64.encode", "hello")).json).toBe('"aGVsbG8="');
    expect((await run("base64.decode", "aGVsbG8")).json).toBe('{"$base64":"aGVsbG8="}');
    expect((await run("base64.decode", "aGVs!bG8")).error).toBe(
      "base64.decode: invalid base64 character b'!' at offset 4",
    );
    expect((await run("base64.decode", "a")).error).toMatch(/one more than a multiple of 4/);
  });
  it("json.validate", async () => {
    const schema = { type: "object", required: ["a"], properties: { b: { minimum: 0 } } };
    expect((await run("json.validate", '{"b": -1}', { schema })).json).toBe(
      '{"valid":false,"errors":[{"path":"","keyword":"required","message":"missing required property \\"a\\""},' +
        '{"path":"/b","keyword":"minimum","message":"failed minimum: 0"}]}',
    );
  });
  it("json.transform keeps key order and JS number rules", async () => {
    const doc = '{"people":[{"name":"ann","age":31},{"name":"bob","age":25}],"b":1.0,"2024":2}';
    expect((await run("json.transform", doc, { expression: "people[?age > `30`].name" })).json).toBe('["ann"]');
    expect((await run("json.transform", doc, { expression: "[b, keys(@)]" })).json).toBe('[1,["people","b","2024"]]');
    expect((await run("json.transform", "[0.1,0.2,0.3]", { expression: "sum(@)" })).json).toBe("0.6000000000000001");
  });
  it("csv.summary", async () => {
    expect((await run("csv.summary", "a,b\n1,x\n3,x\n,y\n")).json).toBe(
      '{"rows":3,"columns":{"a":{"count":2,"missing":1,"numeric":true,"min":1.0,"max":3.0,"mean":2.0,"std":1.0},' +
        '"b":{"count":3,"missing":0,"numeric":false,"unique":2,"top":"x"}}}',
    );
    expect((await run("csv.summary", 'a,b\n"x"y,1\n')).error).toBe(`csv.summary: CSV line 2: ',' expected after '"'`);
  });
  it("text.stats", async () => {
    expect((await run("text.stats", "The cat and the hat.")).json).toBe(
      '{"bytes":20,"chars":20,"lines":1,"words":5,"unique_words":4,"top_words":[["the",2],["and",1],["cat",1],["hat",1]]}',
    );
  });
  it("np.stats", async () => {
    expect((await run("np.stats", "[4, 1, 3, 2]")).json).toBe(
      '{"count":4,"sum":10.0,"mean":2.5,"std":1.118033988749895,"min":1.0,"max":4.0,"median":2.5,"p25":1.75,"p75":3.25}',
    );
    expect((await run("np.stats", "[1, true]")).error).toBe("np.stats: input[1] is not a number: True");
  });
  it("np.montecarlo_pi example", async () => {
    expect((await run("np.montecarlo_pi", "", { samples: 1000000, seed: 0 })).json).toBe(
      '{"pi":3.141624,"inside":785406,"samples":1000000}',
    );
  });
  it("every portable kind is registered at version 1", () => {
    expect(Object.keys(KINDS).sort()).toEqual([
      "base64.decode", "base64.encode", "csv.summary", "hash.blake2b", "hash.sha256",
      "json.transform", "json.validate", "np.montecarlo_pi", "np.stats", "text.stats",
    ]);
  });
});

describe("splitmix64 with 32-bit halves equals the BigInt definition", () => {
  const MASK = (1n << 64n) - 1n;
  const ref = (seed, i) => {
    let z = (seed + BigInt(i + 1) * 0x9e3779b97f4a7c15n) & MASK;
    z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK;
    z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK;
    return z ^ (z >> 31n);
  };
  for (const seed of [0n, 1n, 42n, (1n << 53n) + 1n, 12345678901234567890n, MASK]) {
    it(`seed ${seed}`, () => {
      const next = splitmix64(seed);
      for (let i = 0; i < 2000; i++) {
        const [h, l] = next();
        expect((BigInt(h) << 32n) | BigInt(l)).toBe(ref(seed, i));
      }
    });
  }
  it("seed 0 starts with 0xE220A8397B1DCDAF", () => {
    const [h, l] = splitmix64(0)();
    expect(h.toString(16) + l.toString(16).padStart(8, "0")).toBe("e220a8397b1dcdaf");
  });
});

describe("JSON as Python reads it and as the contract writes it", () => {
  const err = (text) => {
    try {
      parseJSON(text);
      return null;
    } catch (e) {
      return e.message;
    }
  };
  it("gives CPython's error messages", () => {
    expect(err("")).toBe("Expecting value: line 1 column 1 (char 0)");
    expect(err("[1,]")).toBe("Expecting value: line 1 column 4 (char 3)");
    expect(err('{"a" 1}')).toBe("Expecting ':' delimiter: line 1 column 6 (char 5)");
    expect(err('{"a":1,}')).toBe("Expecting property name enclosed in double quotes: line 1 column 8 (char 7)");
    expect(err("01")).toBe("Extra data: line 1 column 2 (char 1)");
    expect(err('"\\u12x4"')).toBe("Invalid \\uXXXX escape: line 1 column 3 (char 2)");
    expect(err('"abc')).toBe("Unterminated string starting at: line 1 column 1 (char 0)");
    expect(err("[\n1,\n-]")).toBe("Expecting value: line 3 column 1 (char 5)");
    expect(err("NaN")).toBe("NaN is not valid JSON");
  });
  it("keeps integer-like keys in order", () => {
    expect(Object.keys(parseJSON('{"b":1,"2024":2,"a":3}'))).toEqual(["b", "2024", "a"]);
  });
  it("writes floats as floats and ints as ints", () => {
    expect(stringify([new F64(2), 2, new F64(1e21), 2 ** 60, 0.5, new F64(-0)])).toBe(
      "[2.0,2,1e+21,1152921504606847000.0,0.5,-0.0]",
    );
  });
  it("lossless mode keeps 2.0 and u64 integers", () => {
    const v = parseJSON('{"f": 2.0, "s": 18446744073709551615}', { lossless: true });
    expect(stringify(v)).toBe('{"f":2.0,"s":18446744073709551615}');
  });
  it("formats floats as Python repr does", () => {
    expect(pyFloatRepr(1e16)).toBe("1e+16");
    expect(pyFloatRepr(1.5e-7)).toBe("1.5e-07");
    expect(pyFloatRepr(123.0)).toBe("123.0");
  });
});
