"""Hypothesis strategies for protobuf messages, built from their descriptors.

`Generator.message(descriptor)` builds any message field by field: strings
that paths and names trip over (empty, `..`, `/abs`, NUL, unicode, very long),
integers at and around the limits of their wire type, enums with values the
schema does not know, repeated fields and maps, sub-messages down to a depth
bound. `Generator.mutated(base)` takes a valid message and changes one field
somewhere inside it, so the checks behind the first ones are reached too.

An `Override` picks the strategy for a named field instead (IDs that exist,
paths that stay inside a test's directory, commands that are safe to run).
Nothing here knows about CRI.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

F = FieldDescriptor

# Strings that validation has to think about, besides generated text.
TRICKY_STRINGS = (
    "",
    " ",
    ".",
    "..",
    "/",
    "//",
    "/abs",
    "/abs/../..",
    "../../../etc/passwd",
    "a/../b",
    "a/b",
    "relative",
    "-",
    "--flag",
    "*",
    "%s%n",
    "a b",
    "a\tb",
    "a\nb",
    "\n",
    "a\x00b",
    "\x00",
    "é",
    "日本語",
    "🙂",
    "\u202e",
    "UPPER",
    "a=b",
    "a:b",
    "a@b",
    "0",
    "-1",
    "sha256:",
    "sha256:" + "0" * 64,
    "0" * 64,
    "f" * 12,
    "a" * 63,
    "a" * 64,
    "a" * 256,
    "a" * 4097,
)
# Long enough to cross path (4096), name (255) and HTTP/2 frame (16 KiB) limits; rare, and capped so a message with
# many of them stays below the 4 MiB a gRPC server takes by default.
LONG_STRINGS = ("x" * 20_000, "é" * 40_000)

_INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}

Override = Callable[[Descriptor, FieldDescriptor], "st.SearchStrategy[Any] | None"]


def strings() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(TRICKY_STRINGS),
        st.text(max_size=24),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._/", max_size=40),
        st.sampled_from(LONG_STRINGS),
    )


def integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Any integer of the range, with its edges and the small numbers near zero more likely."""
    edges = {lo, hi, lo + 1, hi - 1, 0, 1, 2, -1, 2**31 - 1, 2**31, 2**32, 2**53, 2**63 - 1}
    edges |= {-e for e in list(edges)}
    return st.one_of(
        st.sampled_from(sorted(e for e in edges if lo <= e <= hi)),
        st.integers(max(lo, -100), min(hi, 100_000)),
        st.integers(lo, hi),
    )


def floats() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, 1e308]), st.floats(width=32))


def enum_values(field: FieldDescriptor) -> st.SearchStrategy[int]:
    """Known values mostly; unknown ones (proto3 enums are open) and the int32 edges too."""
    assert field.enum_type is not None, field.full_name
    known = [v.number for v in field.enum_type.values]
    unknown = [max(known) + 1, 99, -1, 2**31 - 1, -(2**31)]
    return st.one_of(st.sampled_from(known), st.sampled_from(unknown))


def is_map(field: FieldDescriptor) -> bool:
    return field.type == F.TYPE_MESSAGE and bool(sub(field).GetOptions().map_entry)


def sub(field: FieldDescriptor) -> Descriptor:
    """The message type of a message field."""
    assert field.message_type is not None, field.full_name
    return field.message_type


def descriptor_of(message: Message) -> Descriptor:
    return cast(Descriptor, message.DESCRIPTOR)


def message_class(descriptor: Descriptor) -> type[Message]:
    cls: type[Message] = GetMessageClass(descriptor)
    return cls


def assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    """Sets a field from a plain value: a list for a repeated field, a dict for a map, a message or a scalar."""
    message.ClearField(field.name)
    target = getattr(message, field.name)
    if is_map(field):
        value_field = sub(field).fields_by_name["value"]
        for key, item in value.items():
            if value_field.type == F.TYPE_MESSAGE:
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif field.is_repeated:
        target.extend(value)
    elif field.type == F.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


class Generator:
    """Strategies for messages of one schema, with field overrides, lists and maps of at most `max_items`."""

    def __init__(self, override: Override | None = None, max_depth: int = 4, max_items: int = 3) -> None:
        self.override = override
        self.max_depth = max_depth
        self.max_items = max_items
        self._cache: dict[tuple[str, int], st.SearchStrategy[Message]] = {}

    # ---- single values ------------------------------------------------------------------------

    def scalar(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        """One value of the field's type (one element of a repeated field)."""
        t = field.type
        simple: dict[int, Callable[[], st.SearchStrategy[Any]]] = {
            F.TYPE_STRING: strings,
            F.TYPE_BYTES: lambda: st.binary(max_size=64),
            F.TYPE_BOOL: st.booleans,
            F.TYPE_DOUBLE: floats,
            F.TYPE_FLOAT: floats,
            F.TYPE_ENUM: lambda: enum_values(field),
            F.TYPE_MESSAGE: lambda: self.message(sub(field), depth - 1),
        }
        if t in simple:
            return simple[t]()
        if t in _INT_RANGES:
            return integers(*_INT_RANGES[t])
        raise TypeError(f"{field.full_name}: unsupported field type {t}")

    def value(self, containing: Descriptor, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        """A whole field's value: a list for a repeated field, a dict for a map."""
        if self.override is not None:
            chosen = self.override(containing, field)
            if chosen is not None:
                return chosen
        if is_map(field):
            entry = sub(field)
            return st.dictionaries(
                self.value(entry, entry.fields_by_name["key"], depth),
                self.value(entry, entry.fields_by_name["value"], depth),
                max_size=self.max_items,
            )
        if field.is_repeated:
            return st.lists(self.scalar(field, depth), max_size=self.max_items)
        return self.scalar(field, depth)

    # ---- messages -----------------------------------------------------------------------------

    def message(self, descriptor: Descriptor, depth: int | None = None) -> st.SearchStrategy[Message]:
        """Any message of the type: each field absent or set to a generated value; sub-messages to `depth`."""
        depth = self.max_depth if depth is None else depth
        key = (descriptor.full_name, depth)
        if key not in self._cache:
            self._cache[key] = self._message(descriptor, depth)
        return self._cache[key]

    def _deferred(self, descriptor: Descriptor, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        """The field's strategy, built when first drawn (messages refer to each other)."""
        return st.deferred(lambda: self.value(descriptor, field, depth))

    def _message(self, descriptor: Descriptor, depth: int) -> st.SearchStrategy[Message]:
        cls = message_class(descriptor)
        fields = [f for f in descriptor.fields if depth > 0 or (f.type != F.TYPE_MESSAGE or is_map(f))]
        if not fields:
            return st.just(cls())
        optional = {f.name: self._deferred(descriptor, f, depth) for f in fields}

        def build(values: dict[str, Any]) -> Message:
            out = cls()
            for name, value in values.items():
                assign(out, descriptor.fields_by_name[name], value)
            return out

        return st.fixed_dictionaries({}, optional=optional).map(build)

    def leaf_paths(self, descriptor: Descriptor, depth: int = 8) -> list[tuple[FieldDescriptor, ...]]:
        """Every field path from `descriptor` down to a scalar, a list of scalars or a map (`depth` levels)."""
        out: list[tuple[FieldDescriptor, ...]] = []
        for fd in descriptor.fields:
            if fd.type == F.TYPE_MESSAGE and not is_map(fd) and depth > 1:
                out += [(fd, *rest) for rest in self.leaf_paths(sub(fd), depth - 1)]
            out.append((fd,))
        return out

    def mutated(self, base: st.SearchStrategy[Message], most: int = 2) -> st.SearchStrategy[Message]:
        """A message from `base` with one field (sometimes up to `most`), anywhere inside it, cleared or set to a
        generated value; the path to it is chosen among all of the type's fields, so deep ones are reached as
        often as top-level ones."""

        @st.composite
        def mutate(draw: st.DrawFn) -> Message:
            original = draw(base)
            out = type(original)()
            out.CopyFrom(original)
            paths = self.leaf_paths(descriptor_of(out))
            for _ in range(draw(st.integers(1, most))):
                path = draw(st.sampled_from(paths))
                target = out
                for fd in path[:-1]:
                    if fd.is_repeated:
                        items = getattr(target, fd.name)
                        if not len(items):
                            items.add()
                        target = items[draw(st.integers(0, len(items) - 1))]
                    else:
                        target = getattr(target, fd.name)
                leaf = path[-1]
                value = draw(st.one_of(st.none(), self.value(descriptor_of(target), leaf, 2)))
                if value is None:
                    target.ClearField(leaf.name)
                else:
                    assign(target, leaf, value)
            return out

        return mutate()
