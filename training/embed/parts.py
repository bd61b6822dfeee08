"""Part files: one Parquet per batch under the run's parts folder, each whole on disk (temp file, rename),
so a killed run resumes after the users they hold."""
from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from producers.stores.warehouse import float32_lists

if TYPE_CHECKING:
    from training.embed.embedder import Encoded


class PartWriter:
    """Writes part files on one background thread, so the model does not wait for Parquet; at most
    two parts wait in memory. `close` waits for every part and re-raises a failed write."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-parts")
        self.pending: list = []

    def submit(self, path: Path, users: list, enc: Encoded, source_hashes: list) -> None:
        while len(self.pending) >= 2:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(write_part, path, users, enc, source_hashes))

    def close(self) -> None:
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pending = []
            self.pool.shutdown(wait=True)


def users_in_parts(parts: Path) -> set:
    import pyarrow.parquet as pq

    done: set = set()
    for f in sorted(parts.glob("batch-*.parquet")):
        done.update(pq.read_table(f, columns=["user_id"]).column("user_id").to_pylist())
    return done


def next_part_index(parts: Path, prefix: str = "batch-") -> int:
    pattern = re.escape(prefix) + r"(\d+)\.parquet"
    indices = [int(m.group(1)) for f in parts.glob(f"{prefix}*.parquet") if (m := re.fullmatch(pattern, f.name))]
    return max(indices, default=-1) + 1


def write_part(path: Path, users: list, enc: Encoded, source_hashes: list) -> None:
    """One batch's rows, written to a temp file and renamed: a part on disk is always whole."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(users)
    vectors = float32_lists(enc.vectors)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    table = pa.table({"user_id": pa.array(users), "vector": vectors,
                      "n_tokens": pa.array(enc.n_tokens.astype(np.int32)),
                      "source_hash": pa.array(source_hashes, type=pa.string()),
                      "produced_at": pa.array([now] * n, type=pa.timestamp("us"))})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
