"""Schema migrations, applied in order; the schema version is SQLite's user_version.

A migration is never edited once released: a change is a new entry. Statements
are split on ";", so a migration may not hold a literal ";" (no triggers).
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: the tables every later capability writes to.
    """
    CREATE TABLE kv (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE name_reservations (
        name     TEXT PRIMARY KEY,
        kind     TEXT NOT NULL CHECK (kind IN ('sandbox', 'container')),
        owner_id TEXT NOT NULL
    );
    CREATE TABLE sandboxes (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL,
        namespace       TEXT NOT NULL,
        uid             TEXT NOT NULL,
        attempt         INTEGER NOT NULL,
        state           TEXT NOT NULL,
        runtime_handler TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        config          BLOB NOT NULL,
        data            TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE containers (
        id         TEXT PRIMARY KEY,
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id),
        name       TEXT NOT NULL,
        attempt    INTEGER NOT NULL,
        state      TEXT NOT NULL,
        image_id   TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        config     BLOB NOT NULL,
        data       TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX containers_by_sandbox ON containers(sandbox_id);
    CREATE TABLE images (
        id         TEXT PRIMARY KEY,
        size       INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        data       TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE image_names (
        name     TEXT PRIMARY KEY,
        image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        kind     TEXT NOT NULL CHECK (kind IN ('tag', 'digest'))
    );
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
