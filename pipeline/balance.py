"""How the driver spreads a block's solve tasks over its workers (no Ray, no I/O: the
benchmarks' extrapolations use the same rule)."""

from __future__ import annotations


def balance(costs: list[int], workers: int) -> list[list[int]]:
    """Largest cost first onto the least loaded worker: deterministic, cost-balanced
    shares of the indices of `costs`."""
    shares: list[list[int]] = [[] for _ in range(workers)]
    load = [0] * workers
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        w = load.index(min(load))
        shares[w].append(i)
        load[w] += costs[i]
    return shares
