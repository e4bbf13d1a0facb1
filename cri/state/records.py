"""One codec for the rows of stored records, derived from their dataclasses.

A record (a sandbox, a container, an image) is a dataclass; its row is a few
SQL columns (IDs, state, timestamps, blobs that queries or constraints need)
plus one JSON `data` text holding every other field. The JSON is derived from
`dataclasses.fields`, so a field added to a record is stored and loaded with
no other edit; before this, each record listed its fields three times (the
dataclass, its writer, its reader) and a field missed by one was silently
dropped at the next start.

The format is the one the hand-written writers used, so existing databases
load: nested dataclasses are objects, enums their values, tuples and lists
arrays, bytes and protobuf messages hex text. A key missing from an old row
takes the field's default; a key no field claims (a field since removed) is
ignored.

Fields marked `metadata=TRANSIENT` (caches) are never stored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Collection, Mapping
from enum import Enum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from google.protobuf.message import Message

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

_TRANSIENT_KEY = "criopy.state.transient"
TRANSIENT: Mapping[str, Any] = types.MappingProxyType({_TRANSIENT_KEY: True})


class RecordError(ValueError):
    """A row that cannot be read back into its record (a corrupt or foreign row)."""


class Row(Generic[T]):
    """How one record type is split between SQL columns and the JSON `data` text."""

    def __init__(self, cls: type[T], columns: Collection[str]) -> None:
        names = {f.name for f in _stored_fields(cls)}
        _hints(cls)  # a field type that cannot be resolved fails at import, not at the first load
        if unknown := set(columns) - names:
            raise TypeError(f"{cls.__name__} has no stored fields {sorted(unknown)}")
        self.cls = cls
        self.columns = frozenset(columns)

    def dump(self, record: T) -> str:
        """The `data` text: every stored field that is not a column."""
        return json.dumps(_encode_fields(record, skip=self.columns))

    def load(self, data_text: str, **columns: Any) -> T:
        """The record from its `data` text and its column values (already of the fields' types)."""
        if columns.keys() != self.columns:
            raise TypeError(f"{self.cls.__name__} row: columns {sorted(columns)}, expected {sorted(self.columns)}")
        where = f"{self.cls.__name__} {columns.get('id', '')}".rstrip()
        try:
            data = json.loads(data_text)
        except ValueError as exc:
            raise RecordError(f"{where}: data is not JSON: {exc}") from None
        return _decode_fields(self.cls, data, where, columns)


def encode(value: Any, where: str = "value") -> Any:
    """A JSON-ready form of a stored value; TypeError naming `where` for a type with no stored form."""
    if isinstance(value, Enum):  # before the plain types: a str-valued enum is a str too
        return value.value
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Message):
        return value.SerializeToString().hex()
    if isinstance(value, bytes):
        return value.hex()
    return _encode_structure(value, where)


def _encode_structure(value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _encode_fields(value)
    if isinstance(value, list | tuple):
        return [encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {_key(key, where): encode(item, f"{where}[{key}]") for key, item in value.items()}
    raise TypeError(f"{where}: a {type(value).__name__} has no stored form")


def decode(tp: Any, value: Any, where: str = "value") -> Any:
    """The value of type `tp` that `encode` stored as `value`; RecordError when it does not fit."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _decode_union(tp, value, where)
    if origin is not None:
        return _decode_generic(tp, value, where)
    if isinstance(tp, type):
        return _decode_class(tp, value, where)
    raise TypeError(f"{where}: type {tp!r} has no stored form")


def _encode_fields(record: DataclassInstance, skip: Collection[str] = ()) -> dict[str, Any]:
    name = type(record).__name__
    return {
        f.name: encode(getattr(record, f.name), f"{name}.{f.name}")
        for f in _stored_fields(type(record))
        if f.name not in skip
    }


def _decode_fields(cls: type[T], data: Any, where: str, columns: Mapping[str, Any] | None = None) -> T:
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected an object, got {type(data).__name__}")
    hints = _hints(cls)
    values = dict(columns or {})
    missing = []
    for f in _stored_fields(cls):
        if f.name in values:
            continue
        if f.name in data:
            values[f.name] = decode(hints[f.name], data[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            missing.append(f.name)
        # else: a row older than the field; the constructor gives it its default
    if missing:
        raise RecordError(f"{where}: missing {', '.join(missing)}")
    return cls(**values)


def _decode_union(tp: Any, value: Any, where: str) -> Any:
    args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
    if value is None and len(args) < len(typing.get_args(tp)):
        return None
    if len(args) != 1:
        raise TypeError(f"{where}: only X | None unions have a stored form, not {tp!r}")
    return decode(args[0], value, where)


def _decode_generic(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        _expect(value, list, where)
        if origin is list:
            return [decode(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
            return tuple(decode(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
        if len(args) != len(value):
            raise RecordError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(decode(arg, item, f"{where}[{i}]") for i, (arg, item) in enumerate(zip(args, value, strict=True)))
    if origin is dict and args[0] is str:
        _expect(value, dict, where)
        return {key: decode(args[1], item, f"{where}[{key}]") for key, item in value.items()}
    raise TypeError(f"{where}: type {tp!r} has no stored form")


def _decode_class(tp: type, value: Any, where: str) -> Any:
    if issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise RecordError(f"{where}: {value!r} is not a {tp.__name__}") from None
    if tp is bytes:
        return _unhex(value, where)
    if issubclass(tp, Message):
        return tp.FromString(_unhex(value, where))
    if dataclasses.is_dataclass(tp):
        return _decode_fields(tp, value, where)
    if typing.is_typeddict(tp):
        return _decode_typeddict(tp, value, where)
    return _decode_scalar(tp, value, where)


def _decode_scalar(tp: type, value: Any, where: str) -> Any:
    if tp is float:
        return float(_expect(value, int | float, where))
    if tp not in (str, bool, int):
        raise TypeError(f"{where}: type {tp.__name__} has no stored form")
    if isinstance(value, bool) is not (tp is bool):  # JSON's true is no int here, nor 1 a bool
        raise RecordError(f"{where}: expected {tp.__name__}, got {value!r}")
    return _expect(value, tp, where)


def _decode_typeddict(tp: type, value: Any, where: str) -> dict[str, Any]:
    # Keys the row lacks stay absent rather than failing the load: a TypedDict has no defaults, and a
    # key added later must not make every older row unreadable.
    hints = _hints(tp)
    return {
        key: decode(hints[key], item, f"{where}[{key}]")
        for key, item in _expect(value, dict, where).items()
        if key in hints
    }


def _unhex(value: Any, where: str) -> bytes:
    try:
        return bytes.fromhex(_expect(value, str, where))
    except ValueError:
        raise RecordError(f"{where}: not hex text") from None


def _expect(value: Any, kind: Any, where: str) -> Any:
    if not isinstance(value, kind):
        raise RecordError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _key(key: Any, where: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"{where}: key {key!r} is not a string (JSON object keys are)")
    return key


@functools.cache
def _stored_fields(cls: type[DataclassInstance]) -> tuple[dataclasses.Field[Any], ...]:
    return tuple(f for f in dataclasses.fields(cls) if f.init and not f.metadata.get(_TRANSIENT_KEY))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # The records use `from __future__ import annotations`: field types are strings until resolved here,
    # against the module that defines each class (so their types must be imported at run time there).
    return typing.get_type_hints(cls)
