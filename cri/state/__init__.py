"""The daemon's persistent state: one SQLite database under the root."""

from cri.state.store import Store

__all__ = ["Store"]
