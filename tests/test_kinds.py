"""Known-answer tests for the task-kind registry and every built-in kind."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import subprocess
import sys
import textwrap
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from jsonschema import validators  # type: ignore[import-untyped,unused-ignore]
from teammesh.node.kinds import (
    Kind,
    Resources,
    builtin_kinds,
    get_kind,
    load_kinds,
    numeric,
    run_kind,
    to_msgpackable,
)
from teammesh.node.kinds.basic import canonical_json, js_number_str
from teammesh.node.kinds.numeric import splitmix64
from teammesh.protocols.errors import TaskError, UnknownKind  # type: ignore[import-not-found,unused-ignore]

KINDS = builtin_kinds()
_M64 = 2**64 - 1


def run(name: str, data: bytes | str = b"", **params: Any) -> Any:
    raw = data.encode() if isinstance(data, str) else data
    result = run_kind(KINDS[name], raw, params)
    kind = KINDS[name]
    # Every output must survive the wire and match its declared schema.
    assert msgpack.unpackb(msgpack.packb(result), raw=False) == result
    if kind.output_schema is not None:
        validators.Draft202012Validator(kind.output_schema).validate(result)
    return result


def fails(name: str, data: bytes | str = b"", **params: Any) -> str:
    raw = data.encode() if isinstance(data, str) else data
    with pytest.raises(TaskError) as info:
        run_kind(KINDS[name], raw, params)
    message = str(info.value)
    assert message.startswith(f"{name}: ")
    assert "\n" not in message
    return message


# --- registry ------------------------------------------------------------------------


def test_builtin_kinds_are_complete_and_well_formed() -> None:
    assert set(KINDS) == {
        "hash.sha256", "hash.blake2b", "base64.encode", "base64.decode", "json.validate",
        "json.transform", "csv.summary", "text.stats", "sleep", "np.matmul", "np.stats",
        "np.montecarlo_pi", "data.correlation", "data.regression", "data.kmeans",
        "data.outliers", "data.timeseries",
    }
    portable = {name for name, kind in KINDS.items() if kind.portable}
    assert portable == {
        "hash.sha256", "hash.blake2b", "base64.encode", "base64.decode", "json.validate",
        "json.transform", "csv.summary", "text.stats", "np.stats", "np.montecarlo_pi",
    }
    for name, kind in KINDS.items():
        assert kind.name == name
        assert kind.version == "1"
        assert kind.description
        assert isinstance(kind.resources, Resources)
        for schema in (kind.params_schema, kind.output_schema):
            if schema is not None:
                validators.Draft202012Validator.check_schema(schema)


def test_import_is_light() -> None:
    code = "import sys, teammesh.node.kinds; print(sorted({'numpy', 'jsonschema', 'jmespath', 'csv'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_kind_suggests_close_names() -> None:
    with pytest.raises(UnknownKind, match=r"hash\.sha265.*hash\.sha256"):
        get_kind(KINDS, "hash.sha265")
    with pytest.raises(UnknownKind, match="unknown task kind 'nope'"):
        get_kind(KINDS, "nope")
    assert get_kind(KINDS, "sleep") is KINDS["sleep"]


def test_allowlist_globs() -> None:
    assert set(load_kinds(["hash.*"])) == {"hash.sha256", "hash.blake2b"}
    assert set(load_kinds(["hash.sha256", "np.*"])) == {
        "hash.sha256", "np.matmul", "np.stats", "np.montecarlo_pi"
    }
    assert set(load_kinds("base64.*")) == {"base64.encode", "base64.decode"}
    assert load_kinds(["*"]).keys() >= KINDS.keys()
    assert load_kinds(None).keys() >= KINDS.keys()
    assert load_kinds([]) == {}


def _double(data: bytes, params: dict[str, Any]) -> bytes:
    return data * 2


DOUBLE = Kind(name="test.double", version="1", description="twice the input", fn=_double)


class _FakeEntryPoint:
    def __init__(self, name: str, value: Any) -> None:
        self.name, self.value, self._value = name, f"fake:{name}", value

    def load(self) -> Any:
        if isinstance(self._value, Exception):
            raise self._value
        return self._value


def test_entry_point_plugins_monkeypatched(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import importlib.metadata

    other = Kind(name="test.other", version="1", description="x", fn=_double)
    clash = Kind(name="hash.sha256", version="9", description="evil", fn=_double)
    eps = [
        _FakeEntryPoint("single", DOUBLE),
        _FakeEntryPoint("many", [other, clash]),
        _FakeEntryPoint("factory", lambda: [Kind("test.made", "1", "x", _double)]),
        _FakeEntryPoint("broken", ImportError("no module named nowhere")),
        _FakeEntryPoint("wrong", "not a kind"),
    ]

    def fake_entry_points(*, group: str) -> list[_FakeEntryPoint]:
        assert group == "teammesh.kinds"
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    with caplog.at_level(logging.WARNING):
        kinds = load_kinds()
    assert kinds["test.double"] is DOUBLE
    assert kinds["test.other"] is other
    assert "test.made" in kinds
    assert kinds["hash.sha256"] is KINDS["hash.sha256"]  # plugins cannot replace built-ins
    assert "broken" in caplog.text
    assert "wrong" in caplog.text
    assert "hash.sha256" in caplog.text
    assert run_kind(kinds["test.double"], b"ab", {}) == b"abab"
    assert set(load_kinds(["test.*"])) == {"test.double", "test.other", "test.made"}


def test_entry_point_plugin_from_dist_info(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tm_plugin_demo.py").write_text(textwrap.dedent("""
        from teammesh.node.kinds import Kind

        def _upper(data, params):
            return data.decode().upper()

        KIND = Kind(name="demo.upper", version="1", description="uppercase", fn=_upper,
                    params_schema={"type": "object", "additionalProperties": False})
    """))
    dist = tmp_path / "tm_plugin_demo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tm-plugin-demo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[teammesh.kinds]\nupper = tm_plugin_demo:KIND\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    kinds = load_kinds(["demo.*"])
    assert list(kinds) == ["demo.upper"]
    assert run_kind(kinds["demo.upper"], b"hi", {}) == "HI"
    with pytest.raises(TaskError, match="'x' was unexpected"):
        run_kind(kinds["demo.upper"], b"hi", {"x": 1})


def test_params_are_validated_and_errors_name_the_param() -> None:
    assert "'digest_size'" in fails("hash.blake2b", b"", digest_size=100)
    assert "'digest_size'" in fails("hash.blake2b", b"", digest_size="32")
    assert "'digest_sise' was unexpected" in fails("hash.blake2b", b"", digest_sise=32)
    assert "'expression' is a required property" in fails("json.transform", b"{}")
    assert "'seconds'" in fails("sleep", seconds=-1)
    assert "'samples'" in fails("np.montecarlo_pi", samples=10**9 + 1)
    assert "'values[1]'" in fails("np.stats", values=[1, "x"])
    with pytest.raises(TaskError, match="params must be a map"):
        run_kind(KINDS["sleep"], b"", [])  # type: ignore[arg-type,unused-ignore]


def test_bad_input_becomes_task_error() -> None:
    assert "not valid JSON" in fails("json.transform", "{nope", expression="a")
    assert "not valid JSON" in fails("np.stats", "[1, NaN]")
    assert "not valid UTF-8" in fails("text.stats", b"\xff\xfe")


def test_to_msgpackable_converts_numpy_and_rejects_junk() -> None:
    value = {"a": np.float64(1.5), "b": np.int64(3), "c": np.array([[1, 2]]), "d": (np.bool_(True),)}
    out = to_msgpackable(value)
    assert out == {"a": 1.5, "b": 3, "c": [[1, 2]], "d": [True]}
    assert type(out["a"]) is float
    assert type(out["b"]) is int
    assert type(out["d"][0]) is bool
    with pytest.raises(TypeError):
        to_msgpackable({1: "x"})
    with pytest.raises(TypeError):
        to_msgpackable({"x": object()})


# --- basic kinds ---------------------------------------------------------------------


def test_hashes() -> None:
    assert run("hash.sha256", b"abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert run("hash.sha256", b"") == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    # RFC 7693 appendix A.
    assert run("hash.blake2b", b"abc") == (
        "ba80a53f981c4d0d6a2797b69f12f6e94c212f14685ac4b74b12bb6fdbffa2d1"
        "7d87c5392aab792dc252d5de4533cc9518d38aa8dbf1925ab92386edd4009923"
    )
    assert run("hash.blake2b", b"abc", digest_size=32) == (
        hashlib.blake2b(b"abc", digest_size=32).hexdigest()
    )
    assert len(run("hash.blake2b", b"abc", digest_size=1)) == 2


def test_base64_round_trips() -> None:
    assert run("base64.encode", b"hello") == "aGVsbG8="
    assert run("base64.encode", b"") == ""
    assert run("base64.encode", b"\xfb\xff", urlsafe=True) == "-_8="
    assert run("base64.decode", "aGVsbG8=") == b"hello"
    assert run("base64.decode", "aGVs\nbG8=\r\n") == b"hello"
    assert run("base64.decode", "aGVsbG8") == b"hello"  # padding optional
    assert run("base64.decode", "-_8", urlsafe=True) == b"\xfb\xff"
    blob = bytes(range(256)) * 3
    assert run("base64.decode", run("base64.encode", blob)) == blob
    assert run("base64.decode", run("base64.encode", blob, urlsafe=True), urlsafe=True) == blob


def test_base64_decode_errors() -> None:
    assert "'!' at offset 4" in fails("base64.decode", "aGVs!G8=")
    assert "padding" in fails("base64.decode", "aGVsbG8===")
    assert "padding" in fails("base64.decode", "aG=VsbG8")
    assert "multiple of 4" in fails("base64.decode", "aGVsb")
    assert "'-'" in fails("base64.decode", "-_8=")


SCHEMA = {
    "type": "object",
    "required": ["name", "age"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": False,
}


def test_json_validate_pass_and_fail() -> None:
    ok = run("json.validate", '{"name": "ada", "age": 36, "tags": ["x"]}', schema=SCHEMA)
    assert ok == {"valid": True, "errors": []}
    bad = run("json.validate", '{"age": -1.5, "tags": ["x", 2], "extra": 1}', schema=SCHEMA)
    assert bad["valid"] is False
    assert bad["errors"] == [
        {"path": "", "keyword": "additionalProperties", "message": "failed additionalProperties: false"},
        {"path": "", "keyword": "required", "message": 'missing required property "name"'},
        {"path": "/age", "keyword": "minimum", "message": "failed minimum: 0"},
        {"path": "/age", "keyword": "type", "message": 'failed type: "integer"'},
        {"path": "/tags/1", "keyword": "type", "message": 'failed type: "string"'},
    ]
    assert len(run("json.validate", '{"tags": [1]}', schema=SCHEMA, max_errors=1)["errors"]) == 1
    assert run("json.validate", "1", schema=False)["valid"] is False
    assert "not a valid JSON Schema" in fails("json.validate", "1", schema={"type": 5})


def test_json_transform() -> None:
    doc = {"people": [{"name": "ann", "age": 31}, {"name": "bob", "age": 25},
                      {"name": "cy", "age": 40}]}
    assert run("json.transform", json.dumps(doc), expression="people[?age > `30`].name") == [
        "ann", "cy"
    ]
    assert run("json.transform", json.dumps(doc), expression="max_by(people, &age).name") == "cy"
    assert run("json.transform", "[1.0, 2.5]", expression="[0]") == 1  # JS has no 1.0
    out = run("json.transform", "[0.1, 0.2, 0.3]", expression="{s: sum(@), a: avg(@)}")
    assert out == {"s": 0.1 + 0.2 + 0.3, "a": (0.1 + 0.2 + 0.3) / 3}  # left-to-right sum
    assert run("json.transform", "[9007199254740993]", expression="[0]") == 9007199254740992.0
    assert run("json.transform", "{}", expression="missing") is None
    assert "not valid JMESPath" in fails("json.transform", "{}", expression="a[")


CSV = (
    "id,score,city,empty\r\n"
    "1,2.5,Paris,\r\n"
    "2, 3.5 ,\"Rome, IT\",\r\n"
    "\r\n"
    "3,,Paris,\r\n"
    "4,-1e1,\"multi\nline\"\r\n"
)


def test_csv_summary_known_answers() -> None:
    out = run("csv.summary", CSV)
    assert out["rows"] == 4
    assert list(out["columns"]) == ["id", "score", "city", "empty"]
    assert out["columns"]["id"] == {
        "count": 4, "missing": 0, "numeric": True, "min": 1.0, "max": 4.0,
        "mean": 2.5, "std": math.sqrt(1.25),
    }
    score = out["columns"]["score"]
    scores = [2.5, 3.5, -10.0]
    mean = (2.5 + 3.5 - 10.0) / 3
    assert score == {
        "count": 3, "missing": 1, "numeric": True, "min": -10.0, "max": 3.5, "mean": mean,
        "std": math.sqrt(sum((v - mean) * (v - mean) for v in scores) / 3),
    }
    assert out["columns"]["city"] == {
        "count": 4, "missing": 0, "numeric": False, "unique": 3, "top": "Paris"
    }
    assert out["columns"]["empty"] == {
        "count": 0, "missing": 4, "numeric": False, "unique": 0, "top": None
    }
    assert all(type(v) is float for k, v in out["columns"]["id"].items() if k in {"min", "mean"})


def test_csv_summary_number_grammar_and_ties() -> None:
    out = run("csv.summary", "\ufeffa,b,c\n1,b,inf\n0x10,a,1\n2,a,\n,b,\n")
    assert out["columns"]["a"]["numeric"] is False  # 0x10 is not a decimal literal
    assert out["columns"]["b"]["top"] == "b"  # tie: first seen wins
    assert out["columns"]["c"]["numeric"] is False  # inf is text
    out = run("csv.summary", "x;y\n1;2\n3;4\n", delimiter=";")
    assert out["columns"]["y"]["mean"] == 3.0


def test_csv_summary_errors() -> None:
    assert "duplicate column 'a'" in fails("csv.summary", "a,a\n1,2\n")
    assert "has 3 fields, header has 2" in fails("csv.summary", "a,b\n1,2,3\n")
    assert "no header" in fails("csv.summary", "")
    assert "CSV line" in fails("csv.summary", 'a,b\n"x"y,1\n')


def test_csv_summary_streams_a_large_file() -> None:
    rows = 200_000
    body = "".join(f"{i},{i % 7},k{i % 3}\n" for i in range(rows))
    out = run("csv.summary", "i,m,k\n" + body)
    assert out["rows"] == rows
    col = out["columns"]["i"]
    assert col["mean"] == (rows - 1) / 2
    assert col["std"] == pytest.approx(np.arange(rows).std(), rel=1e-12)
    assert out["columns"]["k"] == {
        "count": rows, "missing": 0, "numeric": False, "unique": 3, "top": "k0"
    }


def test_text_stats() -> None:
    text = "The cat and the hat.\nThe END, the end!\nİstanbul ΟΔΟΣ café_2 x"
    out = run("text.stats", text)
    assert out["bytes"] == len(text.encode())
    assert out["chars"] == len(text)
    assert out["lines"] == 3
    assert out["words"] == 13
    assert out["unique_words"] == 9
    assert out["top_words"][:3] == [["the", 4], ["end", 2], ["and", 1]]
    assert ["i̇stanbul", 1] in out["top_words"]  # tokenised before lowercasing
    assert ["οδος", 1] in out["top_words"]  # final sigma
    assert run("text.stats", "")["lines"] == 0
    assert run("text.stats", "a\n")["lines"] == 1
    assert run("text.stats", "a\r\nb")["lines"] == 2
    many = run("text.stats", " ".join(f"w{i:02d}" for i in range(30)))
    assert [w for w, _ in many["top_words"]] == [f"w{i:02d}" for i in range(10)]


def test_word_pattern_is_letters_numbers_underscore() -> None:
    # docs/KINDS.md defines words as runs of [\p{L}\p{N}_]; check Python's \w agrees.
    word = re.compile(r"\w")
    for cp in range(0, 0x110000, 7):
        c = chr(cp)
        expected = c == "_" or unicodedata.category(c)[0] in "LN"
        assert bool(word.match(c)) == expected, hex(cp)


def test_sleep() -> None:
    assert run("sleep", seconds=0.01) == {"slept": 0.01}
    assert run("sleep", seconds=0) == {"slept": 0.0}


# --- portable formatting helpers -----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "js"),
    [
        (1.0, "1"), (100.0, "100"), (0.1, "0.1"), (-2.5, "-2.5"), (0.0, "0"), (-0.0, "0"),
        (1e-7, "1e-7"), (1.5e-7, "1.5e-7"), (1e-6, "0.000001"), (0.0001, "0.0001"),
        (1e16, "10000000000000000"), (1e21, "1e+21"), (1.2345e21, "1.2345e+21"),
        (123456789012345680000.0, "123456789012345680000"), (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
    ],
)
def test_js_number_str(value: float, js: str) -> None:
    assert js_number_str(value) == js


def test_canonical_json() -> None:
    value = {"b": [1, 2.0, None, True], "a": "é\n\"", "c": {"x": 1e21}}
    assert canonical_json(value) == '{"b":[1,2,null,true],"a":"é\\n\\"","c":{"x":1e+21}}'


# --- numeric kinds -------------------------------------------------------------------


def test_matmul() -> None:
    a, b = [[1, 2], [3, 4]], [[5, 6], [7, 8]]
    assert run("np.matmul", a=a, b=b) == [[19.0, 22.0], [43.0, 50.0]]
    assert run("np.matmul", json.dumps({"a": [[1, 2, 3]], "b": [[1], [0.5], [2]]})) == [[8.0]]
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((4, 5)), rng.standard_normal((5, 3))
    assert np.allclose(run("np.matmul", a=x.tolist(), b=y.tolist()), x @ y)
    assert "shapes do not match" in fails("np.matmul", a=[[1, 2]], b=[[1, 2]])
    assert "row 1 has 1 columns" in fails("np.matmul", '{"a": [[1, 2], [3]], "b": [[1]]}')
    assert "not both" in fails("np.matmul", '{"a": [[1]], "b": [[1]]}', a=[[1]])
    assert "missing 'b'" in fails("np.matmul", a=[[1]])
    assert "not a number" in fails("np.matmul", '{"a": [[true]], "b": [[1]]}')


def test_np_stats_known_answers() -> None:
    out = run("np.stats", "[4, 1, 3, 2]")
    assert out == {
        "count": 4, "sum": 10.0, "mean": 2.5, "std": math.sqrt(1.25), "min": 1.0,
        "max": 4.0, "median": 2.5, "p25": 1.75, "p75": 3.25,
    }
    assert run("np.stats", values=[7]) == {
        "count": 1, "sum": 7.0, "mean": 7.0, "std": 0.0, "min": 7.0, "max": 7.0,
        "median": 7.0, "p25": 7.0, "p75": 7.0,
    }
    rng = np.random.default_rng(5)
    xs = (rng.standard_normal(1001) * 1e3).tolist()
    out = run("np.stats", values=xs)
    total = 0.0
    for v in xs:
        total += v  # the specified left-to-right sum
    assert out["sum"] == total
    assert out["mean"] == total / len(xs)
    assert out["std"] == pytest.approx(float(np.std(xs)), rel=1e-12)
    for key, q in (("p25", 25), ("median", 50), ("p75", 75)):
        assert out[key] == pytest.approx(float(np.percentile(xs, q)), rel=1e-12, abs=1e-9)
    assert "must not be empty" in fails("np.stats", "[]")
    assert "not a number" in fails("np.stats", "[1, true]")
    assert "as a JSON array input or as param" in fails("np.stats")


def _reference_splitmix64(seed: int) -> Iterator[int]:
    state = seed
    while True:
        state = (state + 0x9E3779B97F4A7C15) & _M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        yield z ^ (z >> 31)


def test_splitmix64_matches_reference() -> None:
    for seed in (0, 1, 12345, _M64):
        ref = _reference_splitmix64(seed)
        assert splitmix64(seed, 0, 50).tolist() == [next(ref) for _ in range(50)]
    ref = _reference_splitmix64(9)
    expected = [next(ref) for _ in range(120)][100:]
    assert splitmix64(9, 100, 20).tolist() == expected
    # Published first output of splitmix64 seeded with 0.
    assert splitmix64(0, 0, 1).tolist() == [0xE220A8397B1DCDAF]


def test_montecarlo_pi_matches_scalar_reference() -> None:
    for seed in (0, 7, _M64):
        ref = _reference_splitmix64(seed)
        inside = 0
        for _ in range(3000):
            x = (next(ref) >> 11) * 2.0**-53
            y = (next(ref) >> 11) * 2.0**-53
            inside += x * x + y * y < 1.0
        assert run("np.montecarlo_pi", samples=3000, seed=seed) == {
            "pi": 4 * inside / 3000, "inside": inside, "samples": 3000
        }


def test_montecarlo_pi_deterministic() -> None:
    first = run("np.montecarlo_pi", samples=1_000_000, seed=0)
    assert first == {"pi": 3.141624, "inside": 785406, "samples": 1_000_000}
    assert run("np.montecarlo_pi") == first  # defaults: 1e6 samples, seed 0
    assert run("np.montecarlo_pi", samples=1_000_000, seed=0) == first
    assert run("np.montecarlo_pi", samples=1_000_000, seed=1)["inside"] != first["inside"]


def test_montecarlo_pi_chunk_boundaries_do_not_change_the_stream(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The kind draws its samples in vectorised steps of _MC_CHUNK; where the steps cut the
    # splitmix64 stream must not change which numbers sample j gets. Odd, tiny and exact
    # step sizes all give the one-step answer, bit for bit.
    samples = 10_007
    monkeypatch.setattr(numeric, "_MC_CHUNK", samples)
    whole = run("np.montecarlo_pi", samples=samples, seed=3)
    for step in (1, 2, 7, 1000, samples - 1, 1 << 20):
        monkeypatch.setattr(numeric, "_MC_CHUNK", step)
        assert run("np.montecarlo_pi", samples=samples, seed=3) == whole, step
    # the real step size, with a boundary 5 samples before the end
    monkeypatch.setattr(numeric, "_MC_CHUNK", 1 << 20)
    big = run("np.montecarlo_pi", samples=(1 << 20) + 5, seed=3)
    monkeypatch.setattr(numeric, "_MC_CHUNK", 1 << 21)
    assert run("np.montecarlo_pi", samples=(1 << 20) + 5, seed=3) == big


# --- data kinds ----------------------------------------------------------------------


def test_correlation_matches_numpy() -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal(50)
    cols = {"x": x.tolist(), "y": (2 * x + rng.standard_normal(50)).tolist(),
            "z": rng.standard_normal(50).tolist(), "label": ["a"] * 50}
    out = run("data.correlation", json.dumps(cols))
    assert out["columns"] == ["x", "y", "z"]
    assert out["n"] == 50
    expected = np.corrcoef([cols["x"], cols["y"], cols["z"]])
    assert np.allclose(out["matrix"], expected, atol=1e-12)
    csv_out = run("data.correlation", "a,b,c\n1,2,5\n2,4,5\n3,7,5\n,1,5\n")
    assert csv_out["n"] == 3
    assert csv_out["matrix"][0][1] == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1])
    assert csv_out["matrix"][2] == [None, None, None]  # constant column
    assert "not numeric" in fails("data.correlation", json.dumps(cols), columns=["x", "label"])
    assert "no column 'q'" in fails("data.correlation", json.dumps(cols), columns=["x", "q"])


def test_regression_recovers_exact_coefficients() -> None:
    records = [{"x1": a, "x2": b, "y": 1 + 2 * a - 3 * b} for a, b in
               [(0, 0), (1, 0), (0, 1), (2, 3), (5, 1), (3, 3)]]
    out = run("data.regression", json.dumps(records), y="y")
    assert out["x"] == ["x1", "x2"]
    assert out["n"] == 6
    assert out["intercept"] == pytest.approx(1.0)
    assert out["coefficients"] == pytest.approx({"x1": 2.0, "x2": -3.0})
    assert out["r2"] == pytest.approx(1.0)
    # Simple regression by hand: x = 1..4, y = 2, 4, 5, 4 -> slope 3.5/5, intercept 2.0.
    simple = run("data.regression", "x,y\n1,2\n2,4\n3,5\n4,4\n", y="y", x=["x"])
    assert simple["coefficients"]["x"] == pytest.approx(0.7)
    assert simple["intercept"] == pytest.approx(2.0)
    assert simple["r2"] == pytest.approx(1 - 2.3 / 4.75)
    assert "collinear" in fails("data.regression", "a,b,y\n1,2,1\n2,4,2\n3,6,4\n4,8,3\n", y="y")


def test_kmeans_is_deterministic_and_finds_blobs() -> None:
    rng = np.random.default_rng(2)
    pts = np.vstack([rng.normal(0, 0.1, (20, 2)), rng.normal(5, 0.1, (20, 2))])
    cols = {"x": pts[:, 0].tolist(), "y": pts[:, 1].tolist()}
    cols["x"][3] = None  # an incomplete row gets no label
    data = json.dumps(cols)
    out = run("data.kmeans", data, k=2, seed=4)
    assert out == run("data.kmeans", data, k=2, seed=4)
    assert out["converged"] is True
    labels = out["labels"]
    assert labels[3] is None
    assert len({labels[i] for i in range(20) if i != 3}) == 1
    assert len({labels[i] for i in range(20, 40)}) == 1
    assert labels[0] != labels[20]
    centroids = sorted(out["centroids"])
    assert np.allclose(centroids[0], pts[[i for i in range(20) if i != 3]].mean(axis=0))
    assert np.allclose(centroids[1], pts[20:].mean(axis=0))
    complete = np.delete(pts, 3, axis=0)
    assigned = np.array([out["centroids"][lbl] for lbl in labels if lbl is not None])
    assert out["inertia"] == pytest.approx(float(((complete - assigned) ** 2).sum()))
    assert "more than the 2 complete rows" in fails("data.kmeans", "[1, 2]", k=3)
    assert "'k'" in fails("data.kmeans", "[1, 2]", k=0)


def test_kmeans_with_duplicate_points() -> None:
    out = run("data.kmeans", "[1, 1, 1, 1]", k=2, seed=0)
    assert out["inertia"] == 0.0
    assert out["centroids"] == [[1.0], [1.0]]


def test_outliers_zscore_and_iqr() -> None:
    values = [10, 12, 11, 13, 12, 11, 10, 12, 11, 100]
    out = run("data.outliers", json.dumps(values), threshold=2)
    arr = np.array(values, dtype=float)
    assert out["method"] == "zscore"
    assert out["column"] == "value"
    assert out["count"] == 10
    assert out["indices"] == [9]
    assert out["values"] == [100.0]
    assert out["lower"] == pytest.approx(arr.mean() - 2 * arr.std())
    iqr = run("data.outliers", json.dumps(values), method="iqr")
    # Sorted: 10 10 11 11 11 12 12 12 13 100 -> Q1 = 11, Q3 = 12, fences 9.5 and 13.5.
    assert (iqr["lower"], iqr["upper"]) == (9.5, 13.5)
    assert iqr["threshold"] == 1.5
    assert iqr["indices"] == [9]
    gaps = run("data.outliers", "a,b\n1,x\n,y\n1,z\n50,w\n1,v\n1,u\n", column="a", method="iqr")
    assert gaps["indices"] == [3]
    assert gaps["values"] == [50.0]
    assert gaps["count"] == 5
    assert "not numeric" in fails("data.outliers", "a,b\n1,x\n", column="b")


def test_timeseries() -> None:
    out = run("data.timeseries", json.dumps({"t": [1, 2, 3, 4, 5], "v": [1, 3, 2, 5, 4]}),
              column="v", window=2)
    assert out["moving_average"] == [2.0, 2.5, 3.5, 4.5]
    assert out["trend"]["slope"] == pytest.approx(0.8)  # np.polyfit(range(5), v, 1)
    assert out["trend"]["intercept"] == pytest.approx(1.4)
    assert out["summary"] == {
        "mean": 3.0, "std": math.sqrt(2.0), "min": 1.0, "max": 5.0,
        "first": 1.0, "last": 4.0, "change": 3.0,
    }
    assert run("data.timeseries", "[1, 2]")["column"] == "value"
    assert "window 9 is longer" in fails("data.timeseries", "[1, 2, 3]", window=9)
    assert "missing value at row 1" in fails("data.timeseries", "[1, null, 3]")


def test_empty_params_shortcut_agrees_with_jsonschema() -> None:
    """validate_params accepts ``{}`` without jsonschema only where jsonschema would."""
    from teammesh.node.kinds import _empty_is_valid

    schemas = [k.params_schema for k in builtin_kinds().values() if k.params_schema]
    schemas += [{"type": "object", "required": ["a"], "properties": {"a": {}}},
                {"type": "object", "minProperties": 1},
                {"type": "object", "allOf": [{"required": ["x"]}]},
                {"type": "array"}]
    for schema in schemas:
        cls = validators.validator_for(schema, default=validators.Draft202012Validator)
        if _empty_is_valid(schema):
            assert cls(schema).is_valid({}), schema
    assert _empty_is_valid(builtin_kinds()["hash.sha256"].params_schema or {})
    assert not _empty_is_valid(schemas[-2])
