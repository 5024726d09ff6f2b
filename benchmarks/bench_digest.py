#!/usr/bin/env python3
"""Which chunk digest the repository records: sha256 against BLAKE2b over 4 MiB chunks.

Run with the project's venv python (stdlib only)::

    /work/main/.venv/bin/python benchmarks/bench_digest.py            # 1 GiB per algorithm and round
    /work/main/.venv/bin/python benchmarks/bench_digest.py --mib 256 --rounds 3

Each round hashes the same random 4 MiB chunks (``--mib`` MiB in all) with
each algorithm, the algorithms alternating (A B, B A, ...); a chunk is one
``hashlib.new(name, chunk).digest()`` call, as ``copy/digests.py`` makes it.
It prints the median GB/s (10^9 bytes per second, one core) of each and the
faster one, which is what ``sendense_nbd.copy.digests.ALGORITHM`` should be.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time

CHUNK = 4 << 20
ALGORITHMS = ("sha256", "blake2b")


def rate(name: str, chunks: list[bytes]) -> float:
    """GB/s of one pass over ``chunks``."""
    start = time.perf_counter()
    for chunk in chunks:
        hashlib.new(name, chunk).digest()
    return sum(map(len, chunks)) / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="MiB hashed per algorithm and round (default 1024)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    args = parser.parse_args()
    chunks = [os.urandom(CHUNK)] * max(1, args.mib // 4)  # one random chunk, hashed again and again
    results: dict[str, list[float]] = {name: [] for name in ALGORITHMS}
    for round_number in range(args.rounds):
        order = ALGORITHMS if round_number % 2 == 0 else ALGORITHMS[::-1]
        for name in order:
            results[name].append(rate(name, chunks))
    medians = {name: statistics.median(values) for name, values in results.items()}
    for name, value in medians.items():
        print(f"{name:8} {value:.2f} GB/s (median of {args.rounds} x {args.mib} MiB in 4 MiB chunks)")
    print(f"chosen: {max(medians, key=lambda name: medians[name])}")


if __name__ == "__main__":
    main()
