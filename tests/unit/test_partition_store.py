"""One partition's RocksDB store: erasure markers are found whatever the filter that spares most reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from streamrec.streams.state_store import PartitionStore, erasure_digest


class CountingDb:
    """The store's database, counting the keys each multi-get asks for."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.asked: list[int] = []

    def __getitem__(self, keys: list[bytes]) -> Any:
        self.asked.append(len(keys))
        return self.db[keys]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def test_erasure_markers_are_read_for_erased_users_only_and_found_after_a_reopen(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "p0")
    erased = [f"erased-{n}" for n in range(200)]
    store.write({"kept": b"state"}, 10, {erasure_digest(u): 1_000 + n for n, u in enumerate(erased)})
    never = [f"shopper-{n}" for n in range(2_000)]

    def read(store: PartitionStore) -> tuple[list[int], int]:
        counting = CountingDb(store.db)
        store.db = counting  # type: ignore[assignment]
        try:
            states, erased_at = store.read(["kept", *never], erased + never)
        finally:
            store.db = counting.db
        assert states[0] == b"state" and states[1:] == [None] * len(never)
        return erased_at, counting.asked[0]

    for restarted in (False, True):
        if restarted:  # a restarted worker: the filter is rebuilt from the markers on disk
            store.close()
            store = PartitionStore(tmp_path / "p0")
        erased_at, keys = read(store)
        assert erased_at == [1_000 + n for n in range(200)] + [0] * len(never)
        # every state, every erased user's marker, and of 2,000 never erased only the filter's few collisions
        assert 1 + len(never) + len(erased) <= keys <= 1 + len(never) + len(erased) + 5
    store.close()
