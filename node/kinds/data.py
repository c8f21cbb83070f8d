"""Built-in tabular-data kinds: correlation, regression, k-means, outliers and time series.

All of them read one table from the input bytes in any of these formats (docs/KINDS.md):

* CSV with a header row (the csv.summary grammar); a column is numeric if every
  non-empty cell is a number, and empty cells are missing values;
* a JSON object of columns, ``{"x": [1, 2, null], "y": [3, 4, 5]}`` (equal lengths);
* a JSON array of records, ``[{"x": 1, "y": 3}, ...]`` (absent keys are missing);
* a JSON array of numbers, read as one column named ``value``.

Results are deterministic for the same input and params; they are not promised to be
bit-identical across machines (BLAS and SIMD summation orders vary), so none is portable.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .base import Kind, Resources
from .basic import csv_reader, params, parse_json, parse_number_cell
from .numeric import quantile_sorted, splitmix64, uniform01

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float64]


@dataclass
class Table:
    """Numeric columns as float64 arrays (NaN = missing), plus names of the other columns."""

    rows: int
    numeric: dict[str, FloatArray] = field(default_factory=dict)
    other: list[str] = field(default_factory=list)

    def column(self, name: str) -> FloatArray:
        if name in self.numeric:
            return self.numeric[name]
        if name in self.other:
            raise ValueError(f"column {name!r} is not numeric")
        raise ValueError(f"no column {name!r}; columns are {', '.join(self.names())}"[:250])

    def names(self) -> list[str]:
        return [*self.numeric, *self.other]

    def pick(self, names: list[str] | None, minimum: int = 1) -> list[str]:
        """The requested columns (all numeric columns by default), checked to exist."""
        chosen = list(self.numeric) if names is None else names
        for name in chosen:
            self.column(name)
        if len(set(chosen)) != len(chosen):
            raise ValueError("columns must not repeat")
        if len(chosen) < minimum:
            raise ValueError(f"need at least {minimum} numeric column(s), found {len(chosen)}")
        return chosen

    def first_numeric(self, name: str | None) -> str:
        if name is not None:
            self.column(name)
            return name
        if not self.numeric:
            raise ValueError("the input has no numeric column")
        return next(iter(self.numeric))


def _cell(value: Any) -> float | None:
    """A JSON cell as a double, NaN for missing (null), None if not a number."""
    if value is None:
        return math.nan
    if type(value) is int or type(value) is float:  # bool is an int subclass
        return float(value)
    return None


def _table_from_columns(columns: dict[str, list[Any]]) -> Table:
    import numpy as np

    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"JSON columns have different lengths: {sorted(lengths)}")
    table = Table(rows=lengths.pop() if lengths else 0)
    for name, values in columns.items():
        cells = [_cell(v) for v in values]
        if any(c is None for c in cells):
            table.other.append(name)
        else:
            table.numeric[name] = np.array(cells, dtype=np.float64)
    return table


def _table_from_json(doc: Any) -> Table:
    if isinstance(doc, dict):
        if not all(isinstance(v, list) for v in doc.values()):
            raise ValueError("a JSON object input must map column names to arrays")
        return _table_from_columns(doc)
    if isinstance(doc, list) and all(isinstance(r, dict) for r in doc) and doc:
        names: dict[str, None] = {}
        for record in doc:
            names.update(dict.fromkeys(record))
        return _table_from_columns({n: [r.get(n) for r in doc] for n in names})
    if isinstance(doc, list):
        return _table_from_columns({"value": doc})
    raise ValueError("JSON input must be an object of columns or an array of records/numbers")


def _table_from_csv(data: bytes) -> Table:
    import numpy as np

    header, rows = csv_reader(data)
    width = len(header)
    values: list[array[float] | None] = [array("d") for _ in header]
    n = 0
    for row in rows:
        n += 1
        for j in range(width):
            col = values[j]
            if col is None:
                continue
            cell = row[j].strip(" \t") if j < len(row) else ""
            if not cell:
                col.append(math.nan)
                continue
            v = parse_number_cell(cell)
            if v is None:
                values[j] = None
            else:
                col.append(v)
    table = Table(rows=n)
    for name, col in zip(header, values, strict=True):
        if col is None:
            table.other.append(name)
        else:
            table.numeric[name] = np.frombuffer(col, dtype=np.float64).copy()
    return table


def load_table(data: bytes) -> Table:
    """Parse the input in whichever of the documented formats it is."""
    head = bytes(data[:64]).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head[:1] in (b"{", b"["):
        return _table_from_json(parse_json(data))
    return _table_from_csv(data)


def _complete_rows(table: Table, names: list[str]) -> tuple[FloatArray, FloatArray]:
    """Matrix of the named columns over rows with no missing value, and those row indices."""
    import numpy as np

    x = np.column_stack([table.column(n) for n in names])
    keep = ~np.isnan(x).any(axis=1)
    return x[keep], np.flatnonzero(keep).astype(np.float64)


def _correlation(data: bytes, p: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    table = load_table(data)
    names = table.pick(p.get("columns"), minimum=2)
    x, _ = _complete_rows(table, names)
    n = len(x)
    if n < 2:
        raise ValueError(f"need at least 2 complete rows, found {n}")
    centred = x - x.mean(axis=0)
    cov = centred.T @ centred
    sd = np.sqrt(np.diag(cov))
    matrix: list[list[float | None]] = []
    for i in range(len(names)):
        row: list[float | None] = []
        for j in range(len(names)):
            if sd[i] == 0 or sd[j] == 0:
                row.append(None)  # a constant column has no correlation with anything
            elif i == j:
                row.append(1.0)
            else:
                row.append(float(min(1.0, max(-1.0, cov[i, j] / (sd[i] * sd[j])))))
        matrix.append(row)
    return {"columns": names, "n": n, "matrix": matrix}


def _regression(data: bytes, p: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    table = load_table(data)
    y_name: str = p["y"]
    table.column(y_name)
    x_names = table.pick(p.get("x") or [n for n in table.numeric if n != y_name])
    if y_name in x_names:
        raise ValueError(f"column {y_name!r} is both y and an x column")
    m, _ = _complete_rows(table, [y_name, *x_names])
    y, x = m[:, 0], m[:, 1:]
    n, k = x.shape
    if n <= k:
        raise ValueError(f"need more complete rows ({n}) than x columns plus one ({k + 1})")
    design = np.column_stack([np.ones(n), x])
    coef, _, rank, _ = np.linalg.lstsq(design, y, rcond=None)
    if rank < k + 1:
        raise ValueError("x columns are collinear or constant; drop some of them")
    residual = y - design @ coef
    ss_res = float(residual @ residual)
    centred = y - y.mean()
    ss_tot = float(centred @ centred)
    return {
        "y": y_name,
        "x": x_names,
        "n": n,
        "intercept": float(coef[0]),
        "coefficients": {name: float(c) for name, c in zip(x_names, coef[1:], strict=True)},
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else None,
    }


def _squared_distances(x: FloatArray, centroids: FloatArray) -> FloatArray:
    import numpy as np

    # One centroid at a time keeps memory at O(n*d) instead of O(n*k*d), and avoids BLAS.
    out = np.empty((len(x), len(centroids)))
    for j, c in enumerate(centroids):
        diff = x - c
        out[:, j] = np.einsum("ij,ij->i", diff, diff)
    return out


def kmeans_plus_plus(x: FloatArray, k: int, seed: int) -> FloatArray:
    """k-means++ seeding driven by splitmix64 draws r_0, r_1, ... (see docs/KINDS.md)."""
    import numpy as np

    n = len(x)
    draws = uniform01(splitmix64(seed, 0, k))
    chosen = [min(int(draws[0] * n), n - 1)]
    d2 = _squared_distances(x, x[chosen]).min(axis=1)
    for c in range(1, k):
        total = float(d2.sum())
        if total == 0.0:
            # Fewer distinct points than k: take the next unused row.
            idx = next(i for i in range(n) if i not in chosen)
        else:
            cumulative = np.cumsum(d2)
            idx = min(int(np.searchsorted(cumulative, draws[c] * total, side="right")), n - 1)
        chosen.append(idx)
        d2 = np.minimum(d2, _squared_distances(x, x[[idx]])[:, 0])
    result: FloatArray = x[chosen].copy()
    return result


def _kmeans(data: bytes, p: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    table = load_table(data)
    names = table.pick(p.get("columns"))
    k: int = p["k"]
    x, kept = _complete_rows(table, names)
    if len(x) < k:
        raise ValueError(f"k={k} is more than the {len(x)} complete rows")
    centroids = kmeans_plus_plus(x, k, int(p.get("seed", 0)))
    labels = np.full(len(x), -1)
    iterations, converged = 0, False
    for _ in range(int(p.get("max_iter", 100))):
        iterations += 1
        new_labels = _squared_distances(x, centroids).argmin(axis=1)
        if np.array_equal(new_labels, labels):
            converged = True
            break
        labels = new_labels
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, x)
        counts = np.bincount(labels, minlength=k)
        filled = counts > 0  # an empty cluster keeps its previous centroid
        centroids[filled] = sums[filled] / counts[filled, None]
    distances = _squared_distances(x, centroids)
    labels = distances.argmin(axis=1)
    inertia = float(distances[np.arange(len(x)), labels].sum())
    all_labels: list[int | None] = [None] * table.rows
    for row, label in zip(kept.astype(int).tolist(), labels.tolist(), strict=True):
        all_labels[row] = label
    return {
        "columns": names,
        "k": k,
        "centroids": centroids.tolist(),
        "labels": all_labels,
        "inertia": inertia,
        "iterations": iterations,
        "converged": converged,
    }


def _outliers(data: bytes, p: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    table = load_table(data)
    name = table.first_numeric(p.get("column"))
    column = table.column(name)
    rows = np.flatnonzero(~np.isnan(column))
    values = column[rows]
    if len(values) == 0:
        raise ValueError(f"column {name!r} has no values")
    method: str = p.get("method", "zscore")
    threshold = float(p.get("threshold", 3.0 if method == "zscore" else 1.5))
    if method == "zscore":
        mean = float(values.mean())
        std = float(values.std())
        lower, upper = mean - threshold * std, mean + threshold * std
    else:
        s: list[float] = np.sort(values).tolist()
        q1, q3 = quantile_sorted(s, 0.25), quantile_sorted(s, 0.75)
        lower, upper = q1 - threshold * (q3 - q1), q3 + threshold * (q3 - q1)
    hit = (values < lower) | (values > upper)
    return {
        "column": name,
        "method": method,
        "threshold": threshold,
        "count": len(values),
        "lower": lower,
        "upper": upper,
        "indices": rows[hit].tolist(),
        "values": values[hit].tolist(),
    }


def _timeseries(data: bytes, p: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    table = load_table(data)
    name = table.first_numeric(p.get("column"))
    x = table.column(name)
    gaps = np.flatnonzero(np.isnan(x))
    if len(gaps):
        raise ValueError(f"column {name!r} has a missing value at row {int(gaps[0])}")
    n = len(x)
    if n < 2:
        raise ValueError(f"need at least 2 values, found {n}")
    window = int(p.get("window", min(3, n)))
    if window > n:
        raise ValueError(f"window {window} is longer than the series ({n} values)")
    moving = np.lib.stride_tricks.sliding_window_view(x, window).mean(axis=1)
    t = np.arange(n, dtype=np.float64) - (n - 1) / 2
    slope = float(t @ (x - x.mean()) / (t @ t))
    mean = float(x.mean())
    return {
        "column": name,
        "count": n,
        "window": window,
        "moving_average": moving.tolist(),
        "trend": {"slope": slope, "intercept": mean - slope * (n - 1) / 2},
        "summary": {
            "mean": mean,
            "std": float(x.std()),
            "min": float(x.min()),
            "max": float(x.max()),
            "first": float(x[0]),
            "last": float(x[-1]),
            "change": float(x[-1] - x[0]),
        },
    }


_NAMES = {"type": "array", "items": {"type": "string"}, "minItems": 1}
_NUM = {"type": "number"}
_NULLABLE = {"type": ["number", "null"]}


def _out(props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props),
            "additionalProperties": False}


KINDS: list[Kind] = [
    Kind(
        name="data.correlation",
        version="1",
        description="Pearson correlation matrix of numeric columns (rows with gaps dropped).",
        fn=_correlation,
        params_schema=params({"columns": {**_NAMES, "minItems": 2}}),
        output_schema=_out(
            {"columns": _NAMES, "n": {"type": "integer"},
             "matrix": {"type": "array", "items": {"type": "array", "items": _NULLABLE}}}
        ),
        resources=Resources(cpu=1.0, memory_mb=1024),
    ),
    Kind(
        name="data.regression",
        version="1",
        description="Ordinary least squares y ~ x columns with intercept; coefficients and r2.",
        fn=_regression,
        params_schema=params({"y": {"type": "string"}, "x": _NAMES}, required=("y",)),
        output_schema=_out(
            {"y": {"type": "string"}, "x": _NAMES, "n": {"type": "integer"},
             "intercept": _NUM, "coefficients": {"type": "object", "additionalProperties": _NUM},
             "r2": _NULLABLE}
        ),
        resources=Resources(cpu=1.0, memory_mb=1024),
    ),
    Kind(
        name="data.kmeans",
        version="1",
        description="k-means (k-means++ seeding from splitmix64(seed), Lloyd iterations).",
        fn=_kmeans,
        params_schema=params(
            {
                "k": {"type": "integer", "minimum": 1, "maximum": 1000},
                "seed": {"type": "integer", "minimum": 0, "maximum": 2**64 - 1, "default": 0},
                "max_iter": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 100},
                "columns": _NAMES,
            },
            required=("k",),
        ),
        output_schema=_out(
            {"columns": _NAMES, "k": {"type": "integer"},
             "centroids": {"type": "array", "items": {"type": "array", "items": _NUM}},
             "labels": {"type": "array", "items": {"type": ["integer", "null"]}},
             "inertia": _NUM, "iterations": {"type": "integer"},
             "converged": {"type": "boolean"}}
        ),
        resources=Resources(cpu=1.0, memory_mb=1024),
    ),
    Kind(
        name="data.outliers",
        version="1",
        description="Values outside mean ± t·std (zscore) or Tukey fences Q1/Q3 ∓ t·IQR (iqr).",
        fn=_outliers,
        params_schema=params(
            {
                "column": {"type": "string"},
                "method": {"enum": ["zscore", "iqr"], "default": "zscore"},
                "threshold": {"type": "number", "exclusiveMinimum": 0},
            }
        ),
        output_schema=_out(
            {"column": {"type": "string"}, "method": {"enum": ["zscore", "iqr"]},
             "threshold": _NUM, "count": {"type": "integer"}, "lower": _NUM, "upper": _NUM,
             "indices": {"type": "array", "items": {"type": "integer"}},
             "values": {"type": "array", "items": _NUM}}
        ),
        resources=Resources(cpu=1.0, memory_mb=1024),
    ),
    Kind(
        name="data.timeseries",
        version="1",
        description="Trailing moving average, linear trend and summary of one numeric column.",
        fn=_timeseries,
        params_schema=params(
            {"column": {"type": "string"},
             "window": {"type": "integer", "minimum": 1}}
        ),
        output_schema=_out(
            {"column": {"type": "string"}, "count": {"type": "integer"},
             "window": {"type": "integer"},
             "moving_average": {"type": "array", "items": _NUM},
             "trend": _out({"slope": _NUM, "intercept": _NUM}),
             "summary": _out({k: _NUM for k in
                              ("mean", "std", "min", "max", "first", "last", "change")})}
        ),
        resources=Resources(cpu=1.0, memory_mb=1024),
    ),
]
