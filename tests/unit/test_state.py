from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cri.state import Store
from cri.state.migrations import SCHEMA_VERSION
from cri.state.store import StateError

TABLES = {"kv", "name_reservations", "sandboxes", "containers", "images", "image_names"}


def test_new_database_is_migrated_and_in_wal_mode(tmp_path):
    store = Store.open(str(tmp_path))
    try:
        assert store.schema_version() == SCHEMA_VERSION
        with sqlite3.connect(store.path) as db:
            names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert names >= TABLES
    finally:
        store.close()


def test_reopening_keeps_data_and_does_not_migrate_again(tmp_path):
    store = Store.open(str(tmp_path))
    store.put("pod_cidr", "10.0.0.0/24")
    store.put("pod_cidr", "10.0.1.0/24")
    store.close()
    store = Store.open(str(tmp_path))
    assert store.get("pod_cidr") == "10.0.1.0/24"
    assert store.get("missing") is None
    store.close()


def test_a_newer_schema_is_refused(tmp_path):
    Store.open(str(tmp_path)).close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StateError, match="newer than this criopy"):
        Store.open(str(tmp_path))


def test_a_failed_transaction_leaves_nothing(tmp_path):
    store = Store.open(str(tmp_path))
    with pytest.raises(RuntimeError), store.transaction() as conn:
        conn.execute("INSERT INTO kv VALUES ('a', '1')")
        raise RuntimeError("step two failed")
    assert store.get("a") is None
    store.close()


WRITER = textwrap.dedent(
    """
    import sys, time
    from cri.state import Store
    store = Store.open(sys.argv[1])
    store.put("committed", "yes")
    with store.transaction() as conn:
        for i in range(5000):
            conn.execute(
                "INSERT INTO sandboxes(id, name, namespace, uid, attempt, state, runtime_handler, created_at, config)"
                " VALUES (?, 'n', 'ns', ?, 0, 'READY', 'runc', 0, x'00')",
                (f"{i:064x}", str(i)),
            )
        conn.execute("INSERT INTO kv VALUES ('half', 'done')")
        print("in-transaction", flush=True)
        time.sleep(60)
    """
)


def test_a_writer_killed_mid_transaction_leaves_a_consistent_database(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "in-transaction"
        writer.kill()  # SIGKILL: no rollback, no cleanup
        writer.wait(10)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    store = Store.open(str(tmp_path))
    try:
        assert store.integrity_ok()
        assert store.get("committed") == "yes"
        assert store.get("half") is None
        with sqlite3.connect(store.path) as db:
            assert db.execute("SELECT count(*) FROM sandboxes").fetchone()[0] == 0
        store.put("after", "crash")
        assert store.get("after") == "crash"
    finally:
        store.close()


LAZY_WRITER = textwrap.dedent(
    """
    import os, sys
    from cri.state import Store
    store = Store.open(sys.argv[1])
    before = store.syncs
    with store.transaction(durable=False) as conn:
        conn.execute("INSERT INTO kv VALUES ('lazy', 'kept')")
    print(f"fsyncs={store.syncs - before}", flush=True)
    os.kill(os.getpid(), 9)  # the daemon dies without closing, checkpointing or syncing anything
    """
)


def test_a_commit_not_waited_onto_the_disk_survives_a_killed_daemon(tmp_path):
    argv = [sys.executable, "-c", LAZY_WRITER, str(tmp_path)]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == -9, done.stderr
    assert done.stdout.strip() == "fsyncs=0"  # not waited onto the disk
    store = Store.open(str(tmp_path))
    try:
        assert store.get("lazy") == "kept"
        assert store.integrity_ok()
    finally:
        store.close()


def test_a_failed_lazy_transaction_leaves_nothing_and_the_next_commit_durable(tmp_path):
    store = Store.open(str(tmp_path))
    try:
        with pytest.raises(RuntimeError), store.transaction(durable=False) as conn:
            conn.execute("INSERT INTO kv VALUES ('a', '1')")
            raise RuntimeError("step two failed")
        assert store.get("a") is None
        before = store.syncs
        with store.transaction() as conn:
            conn.execute("INSERT INTO kv VALUES ('b', '2')")
        assert store.syncs == before + 1  # waited onto the disk
    finally:
        store.close()


def test_durable_commits_made_together_share_fsyncs_and_each_returns_once_on_disk(tmp_path, monkeypatch):
    """Group commit: with a slow disk, the commits made while one fsync runs are covered by the next one;
    none returns before an fsync that started after its own commit."""
    store = Store.open(str(tmp_path))
    real_fsync = Store._fsync
    covered_at_start: list[int] = []

    def slow_fsync(path: Path) -> None:
        covered_at_start.append(store._committed)
        time.sleep(0.02)
        real_fsync(path)

    monkeypatch.setattr(Store, "_fsync", staticmethod(slow_fsync))
    threads, per_thread = 8, 5
    late: list[str] = []

    def writer(n: int) -> None:
        for i in range(per_thread):
            with store.transaction() as conn:
                mine = store._committed + 1  # this commit's number (the lock is held)
                conn.execute("INSERT INTO kv VALUES (?, ?)", (f"k{n}-{i}", "v"))
            if not any(target >= mine for target in covered_at_start):
                late.append(f"k{n}-{i}")

    try:
        before = store.syncs
        pool = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(30)
        assert late == []
        assert all(store.get(f"k{n}-{i}") == "v" for n in range(threads) for i in range(per_thread))
        assert store.syncs - before < threads * per_thread / 2
        assert store._synced == store._committed
    finally:
        store.close()
