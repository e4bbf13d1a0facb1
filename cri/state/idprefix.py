"""Finding an object by its ID or a unique prefix of it (DESIGN 4: crictl users type prefixes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from cri.errors import InvalidArgument

T = TypeVar("T")


def match(table: Mapping[str, T], id_or_prefix: str, field: str, kind: str) -> T | None:
    """The object with this ID or unique ID prefix; None when there is none.

    An empty value or a prefix of several IDs is INVALID_ARGUMENT naming `field`.
    """
    if not id_or_prefix:
        raise InvalidArgument(field, "must not be empty")
    if id_or_prefix in table:
        return table[id_or_prefix]
    matches = [value for key, value in table.items() if key.startswith(id_or_prefix)]
    if len(matches) > 1:
        raise InvalidArgument(field, f"prefix {id_or_prefix!r} matches {len(matches)} {kind}")
    return matches[0] if matches else None
