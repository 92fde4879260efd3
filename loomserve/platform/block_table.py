"""The runner's persistent host copy of every running request's block table.

Each request keeps one row while it runs; a step only appends the blocks the scheduler allocated since the last
one, and the step's table is a single gather of its requests' rows, not a rebuild from Python lists.
"""

from __future__ import annotations

import numpy as np


class BlockTable:
    def __init__(self, max_rows: int, max_blocks_per_row: int) -> None:
        self.table = np.zeros((max_rows, max_blocks_per_row), dtype=np.int64)  # [rows, max_blocks]
        self.free_rows = list(range(max_rows - 1, -1, -1))
        self.rows: dict[str, tuple[int, int]] = {}  # request id -> (row, blocks written)

    def append(self, request_id: str, new_block_ids: list[int], replace: bool = False) -> int:
        """Add the request's newly allocated blocks (its whole table when `replace`); returns its row."""
        entry = self.rows.get(request_id)
        if entry is None:
            if not self.free_rows:
                self._grow()
            entry = (self.free_rows.pop(), 0)
        row, written = entry
        if replace:
            written = 0
        end = written + len(new_block_ids)
        if new_block_ids:
            self.table[row, written:end] = new_block_ids
        self.rows[request_id] = (row, end)
        return row

    def release(self, request_id: str) -> None:
        entry = self.rows.pop(request_id, None)
        if entry is not None:
            self.free_rows.append(entry[0])

    def gather(self, rows: list[int], width: int) -> np.ndarray:
        return self.table[rows, :width]  # [B, width]

    def _grow(self) -> None:
        n = self.table.shape[0]
        self.table = np.concatenate([self.table, np.zeros_like(self.table)])
        self.free_rows.extend(range(2 * n - 1, n - 1, -1))
