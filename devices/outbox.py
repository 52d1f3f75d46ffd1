"""A device's persistent outbox: votes survive a restart, and seqs never repeat.

Rule: a press is one SQLite transaction that takes the next seq and stores the encoded vote, so
a vote either exists with its own seq or not at all, whenever the power goes. A vote leaves only
when the processor's ack names its (epoch, seq) (docs/protocol.md, Acks).

On a microcontroller the same design fits in a ring buffer in flash plus one counter; SQLite is
the readable version of it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from devices.encoder import encode_vote, vote_again

__all__ = ["Outbox", "Pending"]

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS votes (
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    poll TEXT NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (epoch, seq)
);
CREATE TABLE IF NOT EXISTS fates (code INTEGER PRIMARY KEY, n INTEGER NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Pending:
    """A vote waiting for its ack: where it goes and its encoded bytes."""

    epoch: int
    seq: int
    poll: str
    payload: bytes


class Outbox:
    """Votes not yet answered by the processor, in a SQLite file.

    A new store (its file missing: a new device, or one whose flash was wiped) takes the current
    Unix time as its epoch, so it is higher than any epoch the device used before and its seqs
    may start again at 1 (docs/protocol.md, key 4). A device without a clock keeps a boot
    counter in separate storage instead.

    Thread-safe: the device's network loop and its button handler share it.

    Args:
        path: the SQLite file.
        durable: fsync every press (SQLite ``synchronous=FULL``), so a press survives a power
            cut; off, it survives a crash of the process but not of the machine (simulated
            fleets, where hundreds of devices share one disk).
        clock: Unix time, for a new store's epoch.
    """

    def __init__(
        self, path: Path, *, durable: bool = True, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('epoch', ?), ('last_seq', 0)",
                (int(clock()),),
            )
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        self.epoch: int = meta["epoch"]
        self._last_seq: int = meta["last_seq"]
        # A mirror of the votes table, oldest first: the network loop reads it several times a
        # second, SQLite only on a change.
        self._pending: dict[tuple[int, int], Pending] = {
            (e, s): Pending(e, s, p, bytes(b))
            for e, s, p, b in self._db.execute(
                "SELECT epoch, seq, poll, payload FROM votes ORDER BY epoch, seq"
            )
        }

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        # The connection is in autocommit mode: transactions are explicit, and short.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @property
    def last_seq(self) -> int:
        """The highest seq ever given out in this epoch (persisted)."""
        return self._last_seq

    def add(
        self,
        poll: str,
        choice: int | list[int],
        *,
        ts: int | None = None,
        voter: bytes | None = None,
    ) -> Pending:
        """Store a new vote under the next seq; returns it once it is on disk."""
        with self._lock:
            seq = self._last_seq + 1
            payload = encode_vote(choice, seq, ts=ts, voter=voter, epoch=self.epoch)
            with self._transaction():
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (seq,))
                self._db.execute(
                    "INSERT INTO votes VALUES (?, ?, ?, ?)", (self.epoch, seq, poll, payload)
                )
            self._last_seq = seq
            entry = Pending(self.epoch, seq, poll, payload)
            self._pending[(self.epoch, seq)] = entry
            return entry

    def settle(self, epoch: int, seq: int, code: int) -> Pending | None:
        """The processor answered this vote with ``code``: remove it and count the code.

        Returns:
            The vote, or None when it was settled before (a repeated ack) or is not ours.
        """
        with self._lock:
            entry = self._pending.pop((epoch, seq), None)
            if entry is None:
                return None
            with self._transaction():
                self._db.execute("DELETE FROM votes WHERE epoch = ? AND seq = ?", (epoch, seq))
                self._db.execute(
                    "INSERT INTO fates VALUES (?, 1) ON CONFLICT(code) DO UPDATE SET n = n + 1",
                    (code,),
                )
            return entry

    def store_again(self, refused: list[Pending], *, higher: bool) -> list[Pending]:
        """Votes answered `stale_epoch` (not counted: the processor knows a higher epoch of this
        device, whose clock was ahead when an earlier store was made): stored again with new
        seqs, in a new epoch first when ``higher`` (one of them is of the current epoch), higher
        by a step that doubles each time (1, 2, 4... s), all in one transaction.

        Returns:
            The votes as stored now; those no longer waiting are left out.
        """
        with self._lock:
            refused = [p for p in refused if (p.epoch, p.seq) in self._pending]
            epoch, seq = self.epoch, self._last_seq
            with self._transaction():
                if higher:
                    self._db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch_steps', 0)")
                    (steps,) = self._db.execute(
                        "SELECT value FROM meta WHERE key = 'epoch_steps'"
                    ).fetchone()
                    epoch, seq = max(self.epoch + 2**steps, int(self._clock())), 0
                    self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'epoch_steps'")
                    self._db.execute("UPDATE meta SET value = ? WHERE key = 'epoch'", (epoch,))
                again = []
                for old in refused:
                    seq += 1
                    payload = vote_again(old.payload, seq, epoch)
                    self._db.execute(
                        "DELETE FROM votes WHERE epoch = ? AND seq = ?", (old.epoch, old.seq)
                    )
                    self._db.execute(
                        "INSERT INTO votes VALUES (?, ?, ?, ?)", (epoch, seq, old.poll, payload)
                    )
                    again.append(Pending(epoch, seq, old.poll, payload))
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (seq,))
            self.epoch, self._last_seq = epoch, seq
            for old in refused:
                del self._pending[(old.epoch, old.seq)]
            for entry in again:
                self._pending[(entry.epoch, entry.seq)] = entry
            return again

    def pending(self) -> list[Pending]:
        """Every vote without an answer yet, oldest first."""
        with self._lock:
            return list(self._pending.values())

    def depth(self) -> int:
        """How many votes wait for an answer."""
        return len(self._pending)

    def fates(self) -> Counter[int]:
        """How many votes were answered with each code, over the store's life."""
        with self._lock:
            return Counter(dict(self._db.execute("SELECT code, n FROM fates")))

    def close(self) -> None:
        with self._lock:
            self._db.close()
