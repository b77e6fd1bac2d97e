"""Addressable standard-normal draws: row k of a seed's sequence depends only on (seed, k).

Sample's latents, and the posterior draws of Score and Reconstruct, come from here. Row k uses the 2·D
doubles u at positions [2·D·k, 2·D·(k + 1)) of numpy's PCG64 stream for the seed (PCG64 jumps to any
position in O(log n), so no earlier row is generated), and turns each pair (u1, u2) into one normal with the
Box-Muller transform, sqrt(-2·ln(1 - u1))·cos(2π·u2), in float64, then rounded to float32. So row k of
`normal_rows(seed, 0, n, D)` equals `normal_rows(seed, k, 1, D)`, however the rows are split into requests
or stream chunks. The sequence changes only if this module, numpy's PCG64 or its SeedSequence seeding
changes (numpy guarantees both across its releases), or D does (another model).
"""

from __future__ import annotations

import numpy as np

MAX_SEED = 2**64 - 1


def normal_rows(seed: int, first_row: int, rows: int, dim: int) -> np.ndarray:
    """Rows first_row .. first_row + rows - 1 of the seed's sequence of N(0, I) draws, [rows, dim] float32."""
    if rows == 0:
        return np.empty((0, dim), dtype=np.float32)
    bits = np.random.PCG64(seed)
    if first_row:
        bits.advance(2 * dim * first_row)
    uniform = np.random.Generator(bits).random(2 * dim * rows).reshape(rows, dim, 2)
    radius = np.sqrt(-2.0 * np.log1p(-uniform[..., 0]))  # 1 - u is in (0, 1]: the log is finite
    return (radius * np.cos(2.0 * np.pi * uniform[..., 1])).astype(np.float32)
