"""Task kinds: the plugin interface, the registry and the one place kinds are executed.

A *kind* is a named, versioned pure function ``(input bytes, params) -> output``. The
daemon imports this module at start-up to advertise which kinds it runs; worker processes
call :func:`run_kind`. Importing this module must stay cheap, so numpy, jsonschema and
friends are only imported inside the functions that need them.

Third-party packages add kinds through the ``teammesh.kinds`` entry-point group; each entry
point loads a :class:`Kind`, a list of them, or a zero-argument callable returning either.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from teammesh.node.kinds.base import Kind, Resources

# mypy cannot follow the editable-install import hook that maps teammesh.protocols.
from teammesh.protocols.errors import (
    TaskError,
    UnknownKind,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Kind",
    "Resources",
    "builtin_kinds",
    "get_kind",
    "load_kinds",
    "run_guarded",
    "run_kind",
    "to_msgpackable",
]

ENTRY_POINT_GROUP = "teammesh.kinds"
_MAX_MESSAGE = 300

log = logging.getLogger(__name__)




def builtin_kinds() -> dict[str, Kind]:
    """Every kind shipped with teammesh, by name."""
    from . import basic, data, numeric

    out: dict[str, Kind] = {}
    for kind in (*basic.KINDS, *numeric.KINDS, *data.KINDS):
        out[kind.name] = kind
    return out


def _entry_point_kinds() -> list[Kind]:
    from importlib.metadata import entry_points

    found: list[Kind] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        # A broken plugin must not stop the daemon from serving every other kind.
        try:
            loaded: Any = ep.load()
            if callable(loaded) and not isinstance(loaded, Kind):
                loaded = loaded()
            items = [loaded] if isinstance(loaded, Kind) else list(loaded)
            bad = [x for x in items if not isinstance(x, Kind)]
            if bad:
                raise TypeError(f"expected Kind objects, got {type(bad[0]).__name__}")
        except Exception as exc:
            log.warning("skipping kind plugin %r (%s): %s", ep.name, ep.value, exc)
            continue
        found.extend(items)
    return found


def _normalise_allow(allow: Iterable[str] | None) -> list[str] | None:
    if allow is None:
        return None
    # A bare string is an Iterable[str] of characters; nobody means that.
    patterns = [allow] if isinstance(allow, str) else list(allow)
    return None if "*" in patterns else patterns


def load_kinds(allow: Iterable[str] | None = None) -> dict[str, Kind]:
    """Built-in kinds plus entry-point plugins, filtered by ``allow`` (fnmatch globs).

    ``None`` or a pattern ``"*"`` allows everything. A plugin kind whose name is already
    taken is skipped with a warning: plugins cannot replace built-ins or each other.
    """
    kinds = builtin_kinds()
    for kind in _entry_point_kinds():
        if kind.name in kinds:
            log.warning("skipping plugin kind %r: the name is already registered", kind.name)
            continue
        kinds[kind.name] = kind
    patterns = _normalise_allow(allow)
    if patterns is None:
        return kinds
    return {
        name: kind
        for name, kind in kinds.items()
        if any(fnmatch.fnmatchcase(name, p) for p in patterns)
    }


def get_kind(kinds: Mapping[str, Kind], name: str) -> Kind:
    """``kinds[name]``, or :class:`UnknownKind` with a hint about similar names."""
    try:
        return kinds[name]
    except KeyError:
        pass
    import difflib

    close = difflib.get_close_matches(name, list(kinds), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `teammesh kinds`"
    raise UnknownKind(f"unknown task kind {name!r}{hint}")


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _param_path(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_validators: dict[int, tuple[dict[str, Any], Any]] = {}


def _validator(schema: dict[str, Any]) -> Any:
    cached = _validators.get(id(schema))
    # Keeping the schema in the cache entry pins its id() to this object.
    if cached is not None and cached[0] is schema:
        return cached[1]
    from jsonschema import validators  # type: ignore[import-untyped,unused-ignore]

    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    validator = cls(schema)
    _validators[id(schema)] = (schema, validator)
    return validator


_PLAIN_OBJECT_KEYS = frozenset({"type", "properties", "required", "additionalProperties",
                                "$schema", "title", "description"})


def _empty_is_valid(schema: dict[str, Any]) -> bool:
    """True if ``{}`` certainly satisfies ``schema``: a plain object schema with nothing
    required (anything more elaborate goes to jsonschema)."""
    return (schema.get("type") == "object" and not schema.get("required")
            and schema.keys() <= _PLAIN_OBJECT_KEYS)


def validate_params(kind: Kind, params: Any) -> None:
    """Raise :class:`TaskError` naming the first bad param, if any."""
    if not isinstance(params, dict):
        raise TaskError(f"{kind.name}: params must be a map, got {type(params).__name__}")
    if kind.params_schema is None:
        return
    if not params and _empty_is_valid(kind.params_schema):
        return  # the common call: no params; skips loading jsonschema in the daemon
    from jsonschema.exceptions import best_match  # type: ignore[import-untyped,unused-ignore]

    # A param given as a file ({"$cid": ...} at submission) arrives here as bytes; JSON
    # Schema has no bytes type, so properties marked "x-file" accept bytes unchecked.
    props = kind.params_schema.get("properties", {})
    params = {k: v for k, v in params.items()
              if not (isinstance(v, bytes) and props.get(k, {}).get("x-file"))}
    error = best_match(_validator(kind.params_schema).iter_errors(params))
    if error is None:
        return
    where = _param_path(error.absolute_path)
    if where:
        raise TaskError(_one_line(f"{kind.name}: param {where!r}: {error.message}"))
    raise TaskError(_one_line(f"{kind.name}: params: {error.message}"))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing key {exc.args[0]!r}" if exc.args else "missing key"
    return str(exc) or type(exc).__name__


def run_kind(kind: Kind, data: bytes, params: dict[str, Any]) -> Any:
    """Validate ``params``, run ``kind`` and return a msgpack-serialisable result.

    Errors caused by bad input or params come out as ``TaskError("<kind>: <what>")``;
    anything else is a bug in the kind and propagates unchanged.
    """
    validate_params(kind, params)
    try:
        result = kind.fn(data, params)
    except TaskError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, ArithmeticError) as exc:
        # json, base64, jmespath, unicode and numpy (LinAlgError, AxisError) errors are
        # all ValueError subclasses.
        raise TaskError(_one_line(f"{kind.name}: {_describe(exc)}")) from exc
    return to_msgpackable(result)


def run_guarded(kinds: Mapping[str, Kind], name: str, data: bytes,
                params: dict[str, Any]) -> tuple[bool, Any, str | None]:
    """Run one task as ``(ok, output, error)``: a task's failure, never an exception.

    Shared by worker processes and the daemon's inline path, so a task fails with the
    same message wherever it ran.
    """
    try:
        kind = get_kind(kinds, name)
        return True, run_kind(kind, data, params), None
    except TaskError as exc:
        return False, None, str(exc)
    except MemoryError:
        return False, None, "memory limit exceeded (executor.memory_mb)"
    except RecursionError:
        return False, None, "recursion limit exceeded"
    except Exception as exc:  # a buggy kind fails its task, not its process
        return False, None, f"{name} crashed: {type(exc).__name__}: {exc}"[:500]


_PLAIN_ORDER: tuple[type[Any], ...] = (bool, int, float, str, bytes)
_PLAIN = frozenset(_PLAIN_ORDER)


def to_msgpackable(value: Any) -> Any:
    """Convert numpy scalars/arrays and tuples to plain msgpack types; reject the rest."""
    if value is None or type(value) in _PLAIN:
        return value
    for base in _PLAIN_ORDER:  # subclasses such as np.float64 become the plain type
        if isinstance(value, base):
            return base(value)
    if isinstance(value, list | tuple):
        return [to_msgpackable(v) for v in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"output map keys must be str, got {type(k).__name__}")
            out[k] = to_msgpackable(v)
        return out
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if tolist is not None:
        return to_msgpackable(tolist())
    raise TypeError(f"output value of type {type(value).__name__} is not msgpack-serialisable")
