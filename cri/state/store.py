"""SQLite store: WAL journal, versioned schema, short transactions, group commit.

Calls are blocking; async code runs them through offload.to_thread so the
event loop never waits on the disk. One connection, guarded by a lock, because
SQLite serializes writers anyway and the daemon is one process.

Group commit: SQLite commits with synchronous=NORMAL (the WAL is written, not
synced) under the lock; a durable transaction then waits, outside the lock, for
an fsync of the WAL that covers its commit. One fsync covers every commit written
before it, so a burst of pods whose intents are recorded at once shares a few
fsyncs instead of queueing one each behind the lock. Each durable transaction
still returns only once it is on disk (what synchronous=FULL gives in WAL mode:
the WAL synced after the commit); SQLite itself syncs the WAL before each
checkpoint and when it starts reusing it.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cri.errors import NoSpace, is_no_space
from cri.state.migrations import MIGRATIONS, SCHEMA_VERSION

DB_NAME = "state.db"


class StateError(Exception):
    pass


class Store:
    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.path = path
        # One fsync of the WAL at a time; the durable commits that wait are told when each ends (the
        # condition guards _syncing, _synced and syncs).
        self._sync_done = threading.Condition()
        self._syncing = False
        self._committed = 0  # commits written to the WAL (counted under _lock, after their COMMIT)
        self._synced = 0  # commits known to be on disk
        self._dir_synced = False
        self.syncs = 0  # fsyncs of the WAL made (fewer than durable commits when they overlap)

    @classmethod
    def open(cls, root: str) -> Store:
        path = Path(root) / DB_NAME
        path.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below).
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        # The WAL is synced by the store itself, once per group of durable commits (see _sync_through).
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        store = cls(conn, path)
        store._migrate()
        return store

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """All statements inside commit together or not at all.

        A durable commit returns once it is on disk (an fsync of the WAL, shared with the commits made
        meanwhile). With durable=False it returns once the OS has it: it survives a crash of the daemon,
        but a power cut or a kernel crash may lose it, with any commit after it and never one before (the
        WAL is written in order). That suits outcomes that recovery derives again after a reboot (a state
        change, a removal); a record written before anything is made outside the database, which
        recovery needs to undo it, must be durable.
        """
        with self._lock, self._full_is_no_space():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                # SQLite has already rolled back after some failures (SQLITE_FULL in a statement or
                # at COMMIT): a second ROLLBACK would fail and hide the error that matters.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._committed += 1
            mine = self._committed
        if durable:
            self._sync_through(mine)

    def _sync_through(self, commit: int) -> None:
        """Returns once commit number `commit` is on disk: by an fsync of the WAL made now, or by one that
        another thread made meanwhile. Every commit counted before the fsync starts is covered by it (its
        pages were written to the WAL before it was counted).

        A commit covered by the fsync under way returns when that fsync ends. (With a plain lock around
        the fsync, it had to take the lock to learn that, and a thread that had just synced could take
        the lock first for its next commit: the covered commits then waited for one more fsync each.)"""
        with self._sync_done:
            while self._synced < commit and self._syncing:
                self._sync_done.wait()
            if self._synced >= commit:
                return
            self._syncing = True
            target = self._committed
        synced = False
        try:
            with self._full_is_no_space():
                self._fsync(Path(f"{self.path}-wal"))
                if not self._dir_synced:
                    # The WAL's own directory entry, once: it is made at the first write and kept open.
                    self._fsync(self.path.parent)
                    self._dir_synced = True
            synced = True
        finally:
            with self._sync_done:
                self._syncing = False
                if synced:
                    self.syncs += 1
                    self._synced = max(self._synced, target)
                # On failure a waiter takes its turn to sync (and meets the error itself).
                self._sync_done.notify_all()

    @staticmethod
    def _fsync(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextmanager
    def _full_is_no_space(self) -> Iterator[None]:
        """SQLITE_FULL, from a statement or the COMMIT, or ENOSPC from the WAL's fsync, as NoSpace naming the
        database; other errors pass unchanged."""
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            if is_no_space(exc):
                raise NoSpace(self.path.parent, f"writing to the state database {self.path}") from exc
            raise

    def schema_version(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise StateError(
                f"{self.path} has schema version {current}, newer than this criopy ({SCHEMA_VERSION}); "
                "refusing to downgrade it"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            with self.transaction() as conn:
                for statement in MIGRATIONS[version - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version}")

    def integrity_ok(self) -> bool:
        with self._lock:
            return bool(self._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok")

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put(self, key: str, value: str) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO kv(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
