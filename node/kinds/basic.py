"""Built-in kinds on bytes, text, JSON and CSV, plus the portable-output helpers they share.

Every kind here except ``sleep`` is *portable*: docs/KINDS.md specifies its output exactly
enough (number types, map key order, summation order, tie-breaking) for a JavaScript
Worker to produce the same msgpack bytes. The helpers below (strict JSON parsing with
JavaScript number semantics, the CSV grammar, JavaScript number formatting) exist to keep
that promise and are reused by the numeric and data kinds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from .base import Kind, Resources

# Integers beyond this lose precision as JavaScript numbers, so JSON input treats them
# as doubles and outputs encode them as floats.
MAX_SAFE_INT = 2**53 - 1

_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_WORD = re.compile(r"\w+")  # in Python 3.11 exactly [\p{L}\p{N}_]: checked by a test
_CELL_SPACE = " \t"


# --- shared helpers ------------------------------------------------------------------


def _parse_int(text: str) -> int | float:
    value = int(text)
    return value if -MAX_SAFE_INT <= value <= MAX_SAFE_INT else float(value)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(data: bytes, what: str = "input") -> Any:
    """Strict JSON (no NaN/Infinity) from UTF-8 bytes; big integers become doubles like JS."""
    try:
        text = bytes(data).decode("utf-8-sig")
        return json.loads(text, parse_int=_parse_int, parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} is not valid UTF-8: {exc.reason} at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from exc
    except OverflowError as exc:
        raise ValueError(f"{what} has an integer too large for a double") from exc


def js_numbers(value: Any) -> Any:
    """Give JSON-derived numbers one encoding: int if integral and safe, else float.

    JavaScript has no int/float distinction, so this is the only rule a Worker can follow.
    """
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        if value.is_integer() and -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            return int(value)
        return value
    if isinstance(value, int):
        return value if -MAX_SAFE_INT <= value <= MAX_SAFE_INT else float(value)
    if isinstance(value, list):
        return [js_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: js_numbers(v) for k, v in value.items()}
    return value


def js_number_str(x: float) -> str:
    """ECMAScript ``Number.prototype.toString()`` for a finite double."""
    if x == 0:
        return "0"
    if x < 0:
        return "-" + js_number_str(-x)
    # repr() gives the shortest round-tripping digits, as ECMAScript requires.
    mantissa, _, exp_text = repr(x).partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    all_digits = int_part + frac_part
    significant = all_digits.lstrip("0")
    # ECMAScript's n: the value is 0.d1d2... x 10**n, i.e. the decimal point sits after n digits.
    point = len(int_part) + int(exp_text or 0) - (len(all_digits) - len(significant))
    digits = significant.rstrip("0")
    k, n = len(digits), point
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * -n + digits
    e = n - 1
    sign = "+" if e >= 0 else "-"
    head = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{head}e{sign}{abs(e)}"


def canonical_json(value: Any) -> str:
    """Compact JSON exactly as JavaScript ``JSON.stringify`` writes it (maps in order)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return js_number_str(value) if math.isfinite(value) else "null"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ",".join(canonical_json(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (json.dumps(str(k), ensure_ascii=False) + ":" + canonical_json(v)
                 for k, v in value.items())
        return "{" + ",".join(items) + "}"
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def parse_number_cell(cell: str) -> float | None:
    """The CSV number grammar of docs/KINDS.md: a finite decimal literal, else None."""
    if _NUMBER.fullmatch(cell) is None:
        return None
    value = float(cell) + 0.0  # + 0.0 folds -0.0 into 0.0
    return value if math.isfinite(value) else None


def csv_reader(data: bytes, delimiter: str = ",") -> tuple[list[str], Iterator[list[str]]]:
    """Header and a lazy iterator of data rows, decoding the input incrementally.

    Blank lines are skipped; rows longer than the header are an error; short rows are
    returned as they are (their missing cells count as missing).
    """
    import csv

    stream = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", newline="")
    reader = csv.reader(stream, delimiter=delimiter, strict=True)

    def rows() -> Iterator[list[str]]:
        try:
            yield from reader
        except csv.Error as exc:
            raise ValueError(f"CSV line {reader.line_num}: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ValueError(f"input is not valid UTF-8: {exc.reason}") from exc

    it = rows()
    header = next((r for r in it if r), None)
    if header is None:
        raise ValueError("CSV input has no header row")
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise ValueError(f"CSV header has duplicate column {name!r}")
        seen.add(name)

    def body() -> Iterator[list[str]]:
        width = len(header)
        for row in it:
            if not row:
                continue
            if len(row) > width:
                raise ValueError(
                    f"CSV line {reader.line_num} has {len(row)} fields, header has {width}"
                )
            yield row

    return header, body()


def _object(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
    }


def params(props: dict[str, Any] | None = None, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A params schema: an object with exactly these optional/required properties."""
    return _object(props or {}, list(required))


# Hashing 64 KiB takes ~40 us (sha256) here: inline on the daemon (see Kind).
INLINE_HASH_MAX = 64 * 1024


# --- kinds ---------------------------------------------------------------------------


def _sha256(data: bytes, p: dict[str, Any]) -> str:
    return hashlib.sha256(data).hexdigest()


def _blake2b(data: bytes, p: dict[str, Any]) -> str:
    return hashlib.blake2b(data, digest_size=p.get("digest_size", 64)).hexdigest()


def _b64_encode(data: bytes, p: dict[str, Any]) -> str:
    if p.get("urlsafe", False):
        return base64.urlsafe_b64encode(data).decode("ascii")
    return base64.b64encode(data).decode("ascii")


_B64_BAD = {False: re.compile(rb"[^A-Za-z0-9+/=\s]"), True: re.compile(rb"[^A-Za-z0-9\-_=\s]")}


def _b64_decode(data: bytes, p: dict[str, Any]) -> bytes:
    urlsafe = bool(p.get("urlsafe", False))
    bad = _B64_BAD[urlsafe].search(data)
    if bad is not None:
        raise ValueError(f"invalid base64 character {bad.group()!r} at offset {bad.start()}")
    raw = bytes(data).translate(None, b" \t\n\r\f\v")
    body = raw.rstrip(b"=")
    pad = len(raw) - len(body)
    if b"=" in body:
        raise ValueError("invalid base64: '=' padding in the middle of the input")
    if pad > 2 or (pad and len(raw) % 4):
        raise ValueError("invalid base64: wrong amount of '=' padding")
    if len(body) % 4 == 1:
        raise ValueError("invalid base64: input length is one more than a multiple of 4")
    padded = body + b"=" * (-len(body) % 4)
    try:
        if urlsafe:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"invalid base64: {exc}") from exc


def json_pointer(path: Iterable[Any]) -> str:
    """RFC 6901 JSON Pointer for a sequence of keys/indices ("" is the whole document)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


# Keywords whose value is small data, worth quoting in the error message; the rest hold
# subschemas, which would make messages huge.
_QUOTED_KEYWORDS = frozenset({
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
    "exclusiveMinimum", "maxLength", "minLength", "pattern", "format", "maxItems",
    "minItems", "uniqueItems", "maxContains", "minContains", "maxProperties",
    "minProperties", "additionalProperties", "unevaluatedProperties", "items",
    "unevaluatedItems", "dependentRequired",
})


def _json_validate(data: bytes, p: dict[str, Any]) -> dict[str, Any]:
    from jsonschema import exceptions, validators  # type: ignore[import-untyped,unused-ignore]

    schema = p["schema"]
    instance = parse_json(data)
    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        cls.check_schema(schema)
        found = list(cls(schema).iter_errors(instance))
    except exceptions.SchemaError as exc:
        raise ValueError(f"param 'schema' is not a valid JSON Schema: {exc.message}") from exc
    except Exception as exc:  # e.g. referencing.exceptions.Unresolvable for a remote $ref
        if isinstance(exc, ValueError | TypeError):
            raise
        raise ValueError(f"param 'schema' cannot be used: {exc}") from exc
    errors: set[tuple[str, str, str]] = set()
    for err in found:
        path = json_pointer(err.absolute_path)
        keyword = str(err.validator)
        value = err.validator_value
        if keyword == "required" and isinstance(err.instance, dict):
            for name in value:
                if name not in err.instance:
                    errors.add((path, keyword, f"missing required property {canonical_json(name)}"))
            continue
        if keyword in _QUOTED_KEYWORDS and not isinstance(value, dict):
            message = f"failed {keyword}: {canonical_json(value)}"
        else:
            message = f"failed {keyword}"
        errors.add((path, keyword, message))
    ordered = sorted(errors)[: p.get("max_errors", 100)]
    return {
        "valid": not errors,
        "errors": [{"path": a, "keyword": b, "message": c} for a, b, c in ordered],
    }


def _naive_sum(values: list[Any]) -> Any:
    total: Any = 0
    for v in values:
        total += v
    return total


def _jmespath_options() -> Any:
    import jmespath  # type: ignore[import-untyped,unused-ignore]
    from jmespath import functions  # type: ignore[import-untyped,unused-ignore]

    # Python >= 3.12's sum() uses compensated summation for floats; JavaScript adds left
    # to right, so sum() and avg() are redefined as a plain loop.
    def _sum(self: Any, arg: list[Any]) -> Any:
        return _naive_sum(arg)

    def _avg(self: Any, arg: list[Any]) -> Any:
        return _naive_sum(arg) / len(arg) if arg else None

    sig = functions.signature({"types": ["array-number"]})
    cls = functions.FunctionRegistry(
        "PortableFunctions", (functions.Functions,), {"_func_sum": sig(_sum), "_func_avg": sig(_avg)}
    )
    return jmespath.Options(custom_functions=cls())


_options_cache: list[Any] = []


def _json_transform(data: bytes, p: dict[str, Any]) -> Any:
    import jmespath  # type: ignore[import-untyped,unused-ignore]
    from jmespath import exceptions  # type: ignore[import-untyped,unused-ignore]

    if not _options_cache:
        _options_cache.append(_jmespath_options())
    document = parse_json(data)
    try:
        compiled = jmespath.compile(p["expression"])
    except exceptions.ParseError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise ValueError(f"param 'expression' is not valid JMESPath: {first}") from exc
    try:
        result = compiled.search(document, options=_options_cache[0])
    except exceptions.JMESPathError as exc:
        raise ValueError(f"expression failed: {exc}") from exc
    return js_numbers(result)


def _csv_summary(data: bytes, p: dict[str, Any]) -> dict[str, Any]:
    header, rows = csv_reader(data, p.get("delimiter", ","))
    width = len(header)
    count = [0] * width
    missing = [0] * width
    numeric = [True] * width
    low = [math.inf] * width
    high = [-math.inf] * width
    total = [0.0] * width
    n_rows = 0
    # Pass 1 keeps O(columns) state; values are only re-read in pass 2.
    for row in rows:
        n_rows += 1
        for j, cell in enumerate(row):
            c = cell.strip(_CELL_SPACE)
            if not c:
                missing[j] += 1
                continue
            count[j] += 1
            if numeric[j]:
                v = parse_number_cell(c)
                if v is None:
                    numeric[j] = False
                    continue
                total[j] += v
                if v < low[j]:
                    low[j] = v
                if v > high[j]:
                    high[j] = v
        for j in range(len(row), width):
            missing[j] += 1
    is_num = [numeric[j] and count[j] > 0 for j in range(width)]
    mean = [total[j] / count[j] if is_num[j] else 0.0 for j in range(width)]
    m2 = [0.0] * width
    counters: list[Counter[str] | None] = [None if is_num[j] else Counter() for j in range(width)]
    _, rows = csv_reader(data, p.get("delimiter", ","))
    for row in rows:
        for j, cell in enumerate(row):
            c = cell.strip(_CELL_SPACE)
            if not c:
                continue
            counter = counters[j]
            if counter is None:
                d = float(c) + 0.0 - mean[j]
                m2[j] += d * d
            else:
                counter[c] += 1
    columns: dict[str, Any] = {}
    for j, name in enumerate(header):
        col: dict[str, Any] = {"count": count[j], "missing": missing[j], "numeric": is_num[j]}
        counter = counters[j]
        if counter is None:
            col["min"] = low[j]
            col["max"] = high[j]
            col["mean"] = mean[j]
            col["std"] = math.sqrt(m2[j] / count[j])
        else:
            col["unique"] = len(counter)
            # max() keeps the first maximal item and Counter keeps first-seen order.
            col["top"] = max(counter.items(), key=lambda kv: kv[1])[0] if counter else None
        columns[name] = col
    return {"rows": n_rows, "columns": columns}


def _text_stats(data: bytes, p: dict[str, Any]) -> dict[str, Any]:
    import heapq

    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"input is not valid UTF-8: {exc.reason} at byte {exc.start}") from exc
    # Tokenise before lowercasing: lowercasing can create non-word characters (İ -> i̇).
    counts = Counter(map(str.lower, _WORD.findall(text)))
    lines = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    top = heapq.nsmallest(10, counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "bytes": len(data),
        "chars": len(text),
        "lines": lines,
        "words": sum(counts.values()),
        "unique_words": len(counts),
        "top_words": [[w, c] for w, c in top],
    }


def _sleep(data: bytes, p: dict[str, Any]) -> dict[str, Any]:
    seconds = float(p["seconds"])
    time.sleep(seconds)
    return {"slept": seconds}


_HEX = {"type": "string", "pattern": "^[0-9a-f]*$"}
_INT = {"type": "integer", "minimum": 0}
_NUM = {"type": "number"}
_NUM_COLUMN = _object(
    {"count": _INT, "missing": _INT, "numeric": {"const": True},
     "min": _NUM, "max": _NUM, "mean": _NUM, "std": _NUM}
)
_TEXT_COLUMN = _object(
    {"count": _INT, "missing": _INT, "numeric": {"const": False},
     "unique": _INT, "top": {"type": ["string", "null"]}}
)

KINDS: list[Kind] = [
    Kind(
        name="hash.sha256",
        version="1",
        description="SHA-256 of the input, as lowercase hex.",
        fn=_sha256,
        params_schema=params(),
        output_schema={**_HEX, "minLength": 64, "maxLength": 64},
        resources=Resources(cpu=1.0, memory_mb=64),
        portable=True,
        inline_max_bytes=INLINE_HASH_MAX,
    ),
    Kind(
        name="hash.blake2b",
        version="1",
        description="BLAKE2b of the input with digest_size bytes (1..64), as lowercase hex.",
        fn=_blake2b,
        params_schema=params(
            {"digest_size": {"type": "integer", "minimum": 1, "maximum": 64, "default": 64}}
        ),
        output_schema=_HEX,
        resources=Resources(cpu=1.0, memory_mb=64),
        portable=True,
        inline_max_bytes=INLINE_HASH_MAX,
    ),
    Kind(
        name="base64.encode",
        version="1",
        description="Base64 of the input (RFC 4648, padded; urlsafe=true for -_ alphabet).",
        fn=_b64_encode,
        params_schema=params({"urlsafe": {"type": "boolean", "default": False}}),
        output_schema={"type": "string"},
        resources=Resources(cpu=1.0, memory_mb=128),
        portable=True,
    ),
    Kind(
        name="base64.decode",
        version="1",
        description="Bytes from base64 text; ASCII whitespace ignored, padding optional.",
        fn=_b64_decode,
        params_schema=params({"urlsafe": {"type": "boolean", "default": False}}),
        resources=Resources(cpu=1.0, memory_mb=128),
        portable=True,
    ),
    Kind(
        name="json.validate",
        version="1",
        description="Validate a JSON document against the JSON Schema in param 'schema'.",
        fn=_json_validate,
        params_schema=params(
            {
                "schema": {"type": ["object", "boolean"]},
                "max_errors": {"type": "integer", "minimum": 0, "maximum": 10000, "default": 100},
            },
            required=("schema",),
        ),
        output_schema=_object(
            {
                "valid": {"type": "boolean"},
                "errors": {
                    "type": "array",
                    "items": _object(
                        {"path": {"type": "string"}, "keyword": {"type": "string"},
                         "message": {"type": "string"}}
                    ),
                },
            }
        ),
        resources=Resources(cpu=1.0, memory_mb=512),
        portable=True,
    ),
    Kind(
        name="json.transform",
        version="1",
        description="Apply the JMESPath 'expression' to a JSON document.",
        fn=_json_transform,
        params_schema=params({"expression": {"type": "string", "minLength": 1}},
                             required=("expression",)),
        resources=Resources(cpu=1.0, memory_mb=512),
        portable=True,
    ),
    Kind(
        name="csv.summary",
        version="1",
        description="Per-column count/missing/type and numeric or categorical summary of a CSV.",
        fn=_csv_summary,
        params_schema=params({"delimiter": {"enum": [",", ";", "\t", "|"], "default": ","}}),
        output_schema=_object(
            {
                "rows": _INT,
                "columns": {
                    "type": "object",
                    "additionalProperties": {"oneOf": [_NUM_COLUMN, _TEXT_COLUMN]},
                },
            }
        ),
        resources=Resources(cpu=1.0, memory_mb=512),
        portable=True,
    ),
    Kind(
        name="text.stats",
        version="1",
        description="Byte/char/line/word counts and the ten most frequent words of UTF-8 text.",
        fn=_text_stats,
        params_schema=params(),
        output_schema=_object(
            {
                "bytes": _INT, "chars": _INT, "lines": _INT, "words": _INT,
                "unique_words": _INT,
                "top_words": {
                    "type": "array",
                    "maxItems": 10,
                    "items": {
                        "type": "array",
                        "prefixItems": [{"type": "string"}, _INT],
                        "minItems": 2,
                        "maxItems": 2,
                    },
                },
            }
        ),
        resources=Resources(cpu=1.0, memory_mb=1024),
        portable=True,
    ),
    Kind(
        name="sleep",
        version="1",
        description="Sleep for 'seconds' (0..3600); for testing scheduling and timeouts.",
        fn=_sleep,
        params_schema=params({"seconds": {"type": "number", "minimum": 0, "maximum": 3600}},
                             required=("seconds",)),
        output_schema=_object({"slept": _NUM}),
        resources=Resources(cpu=0.0, memory_mb=16),
    ),
]
