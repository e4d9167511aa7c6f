"""The recommendation and profile API (`streamrec api`): an aiohttp service that answers from its own RocksDB
view of the recommendations, state changelog and catalogue topics."""
