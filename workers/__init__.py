"""Thin workers: one method per unit of work. `block.BlockRunner` is plain Python (tests
and benchmarks call it directly); `actors.block_actor()` wraps it as a Ray actor."""
