"""Our low-bit kernel against the dense matmul on Llama-3-70B shapes: the same as
`lamina bench kernels` (see kernels/bench.py for what is measured).

    python benchmarks/kernel_speed.py                               # 70B shapes, batch 1, 8, 32
    python benchmarks/kernel_speed.py --shapes 4096x4096 --bits 3   # anything else
"""

from __future__ import annotations

import argparse
import sys

from kernels import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    sys.exit(bench.main(parser.parse_args()))
