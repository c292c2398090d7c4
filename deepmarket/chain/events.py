"""Tail contract events with a block cursor persisted in SQLite.

Handlers run once per log: each processed log is keyed by (transaction hash, log index) and
recorded in the same SQLite transaction as the handler's own database writes, and the
cursor only moves past a block range once every log in it was handled. A handler that
raises leaves its log unprocessed, so the next poll retries it.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_utils import event_abi_to_log_topic
from web3.contract.contract import Contract

from deepmarket.chain.client import MarketClient

logger = logging.getLogger(__name__)

MAX_BLOCK_RANGE = 2_000  # blocks per eth_getLogs call

SCHEMA = """
CREATE TABLE IF NOT EXISTS event_cursor (name TEXT PRIMARY KEY, block INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS processed_log (
    name TEXT NOT NULL, tx_hash TEXT NOT NULL, log_index INTEGER NOT NULL,
    PRIMARY KEY (name, tx_hash, log_index)
);
"""


@dataclass(frozen=True)
class ChainEvent:
    """One decoded contract log."""

    name: str  # event name, e.g. "JobSubmitted"
    args: dict[str, Any]
    block: int
    tx_hash: str
    log_index: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.tx_hash, self.log_index)


def open_state_db(path: Path) -> sqlite3.Connection:
    """Open (creating) a SQLite database for a daemon's cursor and state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    return db


class EventTailer:
    """Reads the logs of a deployment's contracts in order and hands them to a handler.

    :param name: cursor name, one per consumer (e.g. "coordinator", "lender-3").
    :param event_names: the events to decode; other logs are skipped.
    """

    def __init__(self, client: MarketClient, db: sqlite3.Connection, name: str,
                 event_names: Iterable[str], confirmations: int = 0) -> None:
        self.client = client
        self.db = db
        self.name = name
        self.confirmations = confirmations
        self._decoders: dict[bytes, tuple[Contract, str]] = {}
        wanted = set(event_names)
        for contract in (client.token, client.registry, client.market):
            for item in contract.abi:
                if item.get("type") == "event" and item["name"] in wanted:
                    self._decoders[event_abi_to_log_topic(item)] = (contract, item["name"])
        missing = wanted - {n for _, n in self._decoders.values()}
        if missing:
            raise ValueError(f"unknown events {sorted(missing)}: check the names against the contract ABIs")

    @property
    def cursor(self) -> int:
        """The last block whose logs were all handled."""
        row = self.db.execute("SELECT block FROM event_cursor WHERE name = ?", (self.name,)).fetchone()
        return int(row[0]) if row else self.client.deployment.block - 1

    def fetch(self, from_block: int, to_block: int) -> list[ChainEvent]:
        """Decode the wanted logs in [from_block, to_block], in chain order."""
        addresses = [self.client.token.address, self.client.registry.address, self.client.market.address]
        raw_logs = self.client.w3.eth.get_logs({"address": addresses, "fromBlock": from_block, "toBlock": to_block})
        events = []
        for log in raw_logs:
            if not log["topics"]:
                continue
            decoder = self._decoders.get(bytes(log["topics"][0]))
            if decoder is None:
                continue
            contract, event_name = decoder
            decoded = getattr(contract.events, event_name)().process_log(log)
            events.append(ChainEvent(event_name, dict(decoded["args"]), int(log["blockNumber"]),
                                     "0x" + bytes(log["transactionHash"]).hex(), int(log["logIndex"])))
        events.sort(key=lambda e: (e.block, e.log_index))
        return events

    def poll(self, handler: Callable[[ChainEvent, sqlite3.Connection], None]) -> int:
        """Handle every new log once; return how many were handled.

        `handler(event, db)` runs inside a SQLite transaction that also records the log as
        processed; if it raises, that transaction rolls back and the cursor stays put.
        """
        latest = self.client.w3.eth.block_number - self.confirmations
        handled = 0
        start = self.cursor + 1
        while start <= latest:
            end = min(latest, start + MAX_BLOCK_RANGE - 1)
            for event in self.fetch(start, end):
                if self._seen(event):
                    continue
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    handler(event, self.db)
                    self.db.execute("INSERT INTO processed_log VALUES (?, ?, ?)",
                                    (self.name, event.tx_hash, event.log_index))
                    self.db.execute("COMMIT")
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
                handled += 1
            self.db.execute("INSERT INTO event_cursor VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET block = ?",
                            (self.name, end, end))
            logger.debug("%s: cursor at block %s", self.name, end)
            start = end + 1
        return handled

    def _seen(self, event: ChainEvent) -> bool:
        row = self.db.execute("SELECT 1 FROM processed_log WHERE name = ? AND tx_hash = ? AND log_index = ?",
                              (self.name, event.tx_hash, event.log_index)).fetchone()
        return row is not None
