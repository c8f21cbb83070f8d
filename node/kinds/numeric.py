"""Built-in numpy kinds: matrix product, descriptive statistics and a Monte Carlo estimate of pi.

``np.stats`` and ``np.montecarlo_pi`` are portable: their arithmetic is specified operation
by operation (docs/KINDS.md) so a JavaScript Worker reproduces them bit for bit. numpy is
imported inside the functions; this module is imported by the daemon at start-up.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .base import Kind, Resources
from .basic import params, parse_json

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
_SPLITMIX_M1 = 0xBF58476D1CE4E5B9
_SPLITMIX_M2 = 0x94D049BB133111EB
_MC_CHUNK = 1 << 20  # samples per vectorised step: 16 MiB of uint64 state per step
MAX_SAMPLES = 10**9


def splitmix64(seed: int, start: int, count: int) -> npt.NDArray[np.uint64]:
    """Outputs ``start .. start+count-1`` (0-based) of splitmix64 seeded with ``seed``.

    splitmix64 is counter-based: output i mixes ``seed + (i+1) * GAMMA (mod 2**64)``, so any
    slice of the stream can be computed independently and in parallel.
    """
    import numpy as np

    k = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    z = k * np.uint64(SPLITMIX_GAMMA) + np.uint64(seed)  # uint64 arithmetic wraps mod 2**64
    z ^= z >> np.uint64(30)
    z *= np.uint64(_SPLITMIX_M1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(_SPLITMIX_M2)
    z ^= z >> np.uint64(31)
    return z


def uniform01(bits: npt.NDArray[np.uint64]) -> npt.NDArray[np.float64]:
    """Top 53 bits of each uint64 times 2**-53: exact doubles in [0, 1)."""
    import numpy as np

    return (bits >> np.uint64(11)).astype(np.float64) * (2.0**-53)


def _montecarlo_pi(data: bytes, p: dict[str, Any]) -> dict[str, Any]:
    """Estimate pi by sampling points in the unit square; bit-reproducible in JavaScript.

    Algorithm (version 1), all integers uint64 with wrapping arithmetic:

    1. ``u_i`` for i = 0, 1, 2, ... is splitmix64 output i for ``seed``::

           z = seed + (i + 1) * 0x9E3779B97F4A7C15
           z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
           z = (z ^ (z >> 27)) * 0x94D049BB133111EB
           u_i = z ^ (z >> 31)

    2. ``r_i = (u_i >> 11) * 2**-53`` as an IEEE-754 double (exact, in [0, 1)).
    3. Sample j uses ``x = r_{2j}``, ``y = r_{2j+1}``; it is inside if
       ``x*x + y*y < 1.0``, evaluated as two double multiplications and one addition
       (no fused multiply-add).
    4. ``pi = (4 * inside) / samples``: the exact integer ``4 * inside`` divided once in
       double precision.
    """
    import numpy as np

    samples = int(p.get("samples", 1_000_000))
    seed = int(p.get("seed", 0))
    inside = 0
    for start in range(0, samples, _MC_CHUNK):
        n = min(_MC_CHUNK, samples - start)
        r = uniform01(splitmix64(seed, 2 * start, 2 * n))
        x, y = r[0::2], r[1::2]
        inside += int(np.count_nonzero(x * x + y * y < 1.0))
    return {"pi": (4 * inside) / samples, "inside": inside, "samples": samples}


def _numbers(value: Any, name: str) -> list[float]:
    if not isinstance(value, list):
        raise ValueError(f"{name} must be an array of numbers")
    for i, v in enumerate(value):
        if type(v) is not int and type(v) is not float:  # bool is an int subclass
            raise ValueError(f"{name}[{i}] is not a number: {v!r}"[:200])
    return [float(v) for v in value]


def _matrix(value: Any, name: str) -> npt.NDArray[np.float64]:
    import io

    import numpy as np

    if isinstance(value, bytes):  # a .npy file shared by CID
        try:
            arr = np.load(io.BytesIO(value), allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{name} is not a .npy file: {exc}") from exc
        if arr.ndim != 2:
            raise ValueError(f"{name} must be a 2-D array, got {arr.ndim}-D")
        matrix: npt.NDArray[np.float64] = np.asarray(arr, dtype=np.float64)
        return matrix

    if not isinstance(value, list) or not value or not all(isinstance(r, list) for r in value):
        raise ValueError(f"{name} must be a non-empty array of rows (arrays of numbers)")
    width = len(value[0])
    if width == 0:
        raise ValueError(f"{name} rows must not be empty")
    rows = []
    for i, row in enumerate(value):
        if len(row) != width:
            raise ValueError(f"{name} row {i} has {len(row)} columns, row 0 has {width}")
        rows.append(_numbers(row, f"{name}[{i}]"))
    return np.array(rows, dtype=np.float64)


def _operands(data: bytes, p: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """Operands from the JSON object in the input, or else from params."""
    if not data.strip():
        missing = [n for n in names if n not in p]
        if missing:
            raise ValueError(f"give {', '.join(names)} as params or as a JSON input object; "
                             f"missing {missing[0]!r}")
        return {n: p[n] for n in names}
    if any(n in p for n in names):
        raise ValueError(f"give {', '.join(names)} either in the input or as params, not both")
    doc = parse_json(data)
    if not isinstance(doc, dict):
        raise ValueError(f"input must be a JSON object with keys {', '.join(names)}")
    missing = [n for n in names if n not in doc]
    if missing:
        raise ValueError(f"input JSON object has no key {missing[0]!r}")
    return {n: doc[n] for n in names}


def _matmul(data: bytes, p: dict[str, Any]) -> list[list[float]]:
    ops = _operands(data, p, ("a", "b"))
    a, b = _matrix(ops["a"], "a"), _matrix(ops["b"], "b")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"shapes do not match: a is {a.shape[0]}x{a.shape[1]}, "
                         f"b is {b.shape[0]}x{b.shape[1]}")
    result: list[list[float]] = (a @ b).tolist()
    return result


def quantile_sorted(s: list[float], q: float) -> float:
    """Linear-interpolation quantile of sorted values (numpy 'linear', R type 7), as specified.

    ``h = (n-1)*q; i = floor(h); f = h - i``; the result is ``s[i]`` if ``f == 0``, else
    ``s[i] + f * (s[i+1] - s[i])``.
    """
    h = (len(s) - 1) * q
    i = math.floor(h)
    f = h - i
    return s[i] if f == 0 else s[i] + f * (s[i + 1] - s[i])


def sequential_sum(values: npt.NDArray[np.float64]) -> float:
    """Left-to-right double sum (``np.sum`` is pairwise, which JavaScript would not match)."""
    import numpy as np

    return float(np.add.accumulate(values)[-1]) if len(values) else 0.0


def describe(values: list[float]) -> dict[str, Any]:
    """The np.stats output for a non-empty list of doubles."""
    import numpy as np

    x = np.array(values, dtype=np.float64) + 0.0  # + 0.0 folds -0.0 into 0.0
    n = len(x)
    total = sequential_sum(x)
    mean = total / n
    d = x - mean
    std = math.sqrt(sequential_sum(d * d) / n)
    s: list[float] = np.sort(x).tolist()
    return {
        "count": n,
        "sum": total,
        "mean": mean,
        "std": std,
        "min": s[0],
        "max": s[-1],
        "median": quantile_sorted(s, 0.5),
        "p25": quantile_sorted(s, 0.25),
        "p75": quantile_sorted(s, 0.75),
    }


def _stats(data: bytes, p: dict[str, Any]) -> dict[str, Any]:
    if data.strip():
        if "values" in p:
            raise ValueError("give values either in the input or as a param, not both")
        values = _numbers(parse_json(data), "input")
    elif "values" in p:
        values = _numbers(p["values"], "values")
    else:
        raise ValueError("give the numbers as a JSON array input or as param 'values'")
    if not values:
        raise ValueError("values must not be empty")
    return describe(values)


_MATRIX = {
    "type": "array",
    "minItems": 1,
    "items": {"type": "array", "minItems": 1, "items": {"type": "number"}},
}
_FLOAT = {"type": "number"}
_STATS_OUTPUT = {
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 1},
        **{k: _FLOAT for k in ("sum", "mean", "std", "min", "max", "median", "p25", "p75")},
    },
    "required": ["count", "sum", "mean", "std", "min", "max", "median", "p25", "p75"],
    "additionalProperties": False,
}

KINDS: list[Kind] = [
    Kind(
        name="np.matmul",
        version="1",
        description="Matrix product a @ b in float64; a and b from a JSON input object or params.",
        fn=_matmul,
        params_schema=params({"a": {**_MATRIX, "x-file": "npy"},
                              "b": {**_MATRIX, "x-file": "npy"}}),
        output_schema={"type": "array", "items": {"type": "array", "items": _FLOAT}},
        resources=Resources(cpu=1.0, memory_mb=512),
    ),
    Kind(
        name="np.stats",
        version="1",
        description="count/sum/mean/std/min/max/median/quartiles of a JSON array of numbers.",
        fn=_stats,
        params_schema=params({"values": {"type": "array", "items": {"type": "number"}}}),
        output_schema=_STATS_OUTPUT,
        resources=Resources(cpu=1.0, memory_mb=512),
        portable=True,
    ),
    Kind(
        name="np.montecarlo_pi",
        version="1",
        description="Deterministic Monte Carlo estimate of pi (splitmix64, reproducible in JS).",
        fn=_montecarlo_pi,
        params_schema=params(
            {
                "samples": {"type": "integer", "minimum": 1, "maximum": MAX_SAMPLES,
                            "default": 1_000_000},
                "seed": {"type": "integer", "minimum": 0, "maximum": 2**64 - 1, "default": 0},
            }
        ),
        output_schema={
            "type": "object",
            "properties": {"pi": _FLOAT, "inside": {"type": "integer", "minimum": 0},
                           "samples": {"type": "integer", "minimum": 1}},
            "required": ["pi", "inside", "samples"],
            "additionalProperties": False,
        },
        resources=Resources(cpu=1.0, memory_mb=128),
        portable=True,
    ),
]
