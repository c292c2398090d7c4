"""The coordinator's SQLite state: jobs as seen through contract events, worker readiness and proofs.

Rows change only inside event handlers, in the same transaction that marks the event as
processed, so a restarted coordinator rebuilds exactly what it knew before it stopped.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

SCHEMA = """
CREATE TABLE IF NOT EXISTS job (
    job_id INTEGER PRIMARY KEY,
    borrower TEXT NOT NULL,
    bundle_cid TEXT NOT NULL,
    workers INTEGER NOT NULL,
    status TEXT NOT NULL,             -- queued, running, completed, cancelled, failed, expired
    round INTEGER NOT NULL DEFAULT 0,
    cluster_spec_cid TEXT,
    assigned_at INTEGER,              -- block timestamp of the latest (re)assignment
    epochs INTEGER                    -- from the bundle's training config, once validated
);
CREATE TABLE IF NOT EXISTS job_worker (
    job_id INTEGER NOT NULL, round INTEGER NOT NULL, slot INTEGER NOT NULL, machine_id INTEGER NOT NULL,
    ready INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, round, slot)
);
CREATE TABLE IF NOT EXISTS stopped_worker (
    job_id INTEGER NOT NULL, round INTEGER NOT NULL, machine_id INTEGER NOT NULL, block_time INTEGER NOT NULL,
    PRIMARY KEY (job_id, round, machine_id)
);
CREATE TABLE IF NOT EXISTS proof (
    job_id INTEGER NOT NULL, machine_id INTEGER NOT NULL, checkpoint_index INTEGER NOT NULL,
    checkpoint_cid TEXT NOT NULL, steps INTEGER NOT NULL, payment TEXT NOT NULL, block INTEGER NOT NULL,
    PRIMARY KEY (job_id, machine_id, checkpoint_index)
);
"""


@dataclass(frozen=True)
class JobRow:
    job_id: int
    borrower: str
    bundle_cid: str
    workers: int
    status: str
    round: int
    cluster_spec_cid: str | None
    assigned_at: int | None
    epochs: int | None


def init_schema(db: sqlite3.Connection) -> None:
    db.executescript(SCHEMA)


def jobs_with_status(db: sqlite3.Connection, status: str) -> list[JobRow]:
    rows = db.execute("SELECT job_id, borrower, bundle_cid, workers, status, round, cluster_spec_cid, assigned_at, "
                      "epochs FROM job WHERE status = ? ORDER BY job_id", (status,)).fetchall()
    return [JobRow(*row) for row in rows]


def get_job(db: sqlite3.Connection, job_id: int) -> JobRow | None:
    row = db.execute("SELECT job_id, borrower, bundle_cid, workers, status, round, cluster_spec_cid, assigned_at, "
                     "epochs FROM job WHERE job_id = ?", (job_id,)).fetchone()
    return JobRow(*row) if row else None


def round_workers(db: sqlite3.Connection, job_id: int, round_: int) -> list[tuple[int, int, bool]]:
    """(slot, machine id, ready) of every worker of one round."""
    rows = db.execute("SELECT slot, machine_id, ready FROM job_worker WHERE job_id = ? AND round = ? ORDER BY slot",
                      (job_id, round_)).fetchall()
    return [(int(s), int(m), bool(r)) for s, m, r in rows]


def proofs_at(db: sqlite3.Connection, job_id: int, checkpoint_index: int) -> dict[int, str]:
    """machine id -> checkpoint CID of the proofs recorded for one checkpoint index."""
    rows = db.execute("SELECT machine_id, checkpoint_cid FROM proof WHERE job_id = ? AND checkpoint_index = ?",
                      (job_id, checkpoint_index)).fetchall()
    return {int(m): str(c) for m, c in rows}


def stopped_workers(db: sqlite3.Connection, job_id: int, round_: int) -> dict[int, int]:
    """machine id -> block time of the WorkerStopped reports of one round."""
    rows = db.execute("SELECT machine_id, block_time FROM stopped_worker WHERE job_id = ? AND round = ?",
                      (job_id, round_)).fetchall()
    return {int(m): int(t) for m, t in rows}


def last_checkpoint(db: sqlite3.Connection, job_id: int) -> tuple[int, str] | None:
    """(index, CID) of the highest checkpoint proved for a job, or None."""
    row = db.execute("SELECT checkpoint_index, checkpoint_cid FROM proof WHERE job_id = ? "
                     "ORDER BY checkpoint_index DESC LIMIT 1", (job_id,)).fetchone()
    return (int(row[0]), str(row[1])) if row else None


def checkpoint_cids(db: sqlite3.Connection, job_id: int) -> list[str]:
    """Return the distinct checkpoint CIDs of a job, in checkpoint order."""
    rows = db.execute("SELECT checkpoint_index, checkpoint_cid FROM proof WHERE job_id = ? ORDER BY checkpoint_index",
                      (job_id,)).fetchall()
    seen: dict[int, str] = {}
    for index, cid in rows:
        seen.setdefault(int(index), str(cid))
    return [seen[i] for i in sorted(seen)]
