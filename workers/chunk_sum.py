"""Summing per-chunk Hessians so that the result depends on the chunks only, not on how
many workers held them or which ones.

Floating-point addition is not associative, so the sum is defined by one fixed binary
tree over the chunk indices 0..N-1 (a perfect tree over the next power of two, whose
empty right halves are skipped): value(lo, size) = value(lo, size/2) + value(lo + size/2,
size/2), or only the left half when the right one starts at or after N. Every worker
folds the chunks it owns into the largest whole subtrees it can (a binary counter: at
most about 2 log2 N partial sums at a time, never one per chunk), and one reducer folds
the workers' subtrees, in chunk order, into the root with the same rule. Whoever adds two
subtrees adds the same two arrays, so the root is bit-identical for any partition.
Entries named with the MAXIMA suffix (per-channel max |x|) combine by maximum instead,
which is exact in any order.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

Sums = dict[str, np.ndarray]  # one Hessian per group of linears sharing an input
Node = tuple[int, int, Sums]  # (first chunk, number of chunks it spans in the tree, sums)
MAXIMA = "#absmax"  # the suffix of entries that combine by maximum


def root_size(total: int) -> int:
    return 1 << max(total - 1, 0).bit_length()


def _add(left: Sums, right: Sums) -> Sums:
    return {
        name: np.maximum(left[name], right[name]) if name.endswith(MAXIMA) else left[name] + right[name]
        for name in left
    }


def push(stack: list[Node], node: Node, total: int) -> None:
    """Add `node` (the next subtree to the right of the stack's) and fold what it completes."""
    stack.append(node)
    while True:
        lo, size, sums = stack[-1]
        if size < root_size(total) and lo % (2 * size) == 0 and lo + size >= total:
            stack[-1] = (lo, 2 * size, sums)  # a left half whose right half is empty: its parent
            continue
        if len(stack) >= 2:
            (lo1, size1, left), (lo2, size2, right) = stack[-2], stack[-1]
            if size1 == size2 and lo1 % (2 * size1) == 0 and lo2 == lo1 + size1:
                stack[-2:] = [(lo1, 2 * size1, _add(left, right))]
                continue
        return


def fold(nodes: Iterable[Node], total: int) -> Sums:
    """The root of the tree from subtrees covering chunks 0..total-1, given in chunk order."""
    stack: list[Node] = []
    for node in nodes:
        push(stack, node, total)
    if len(stack) != 1 or stack[0][:2] != (0, root_size(total)):
        spans = [(lo, size) for lo, size, _ in stack]
        raise ValueError(f"chunk sums do not cover chunks 0..{total - 1} in order: {spans}")
    return stack[0][2]
