"""Time to fit one layer with QuIP# (E8P) and QuIP (scalar 2-bit), phase by phase,
against GPTQ 2-bit g64 on the same layer in the same run.

QuIP's extra work over GPTQ is the rotation of W and H (O(out in log in) and O(in^2 log
in)) and, for E8P, the nearest-point search of each 8 columns (256 absolute vectors x 2
shifts per vector). The solve is linear in the rows, so on CPU it is timed on `--rows` of
them and scaled up; on a GPU pass `--rows 0`.

    python benchmarks/quip_layer.py                                  # 4096x4096, 256 rows solved
    python benchmarks/quip_layer.py --shape 28672x8192 --rows 128    # Llama-3-70B gate/up (28672 = 28 x 1024)
    python benchmarks/quip_layer.py --device cuda --rows 0 --shape 8192x28672
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algorithms.gptq import GPTQConfig, gptq, prepare
from algorithms.hessian import proxy_error
from algorithms.quip import QuipConfig, QuipScheme, quip_rows, rotate_hessian, rotate_weight, signs
from algorithms.quip import prepare as quip_prepare
from algorithms.types import UniformScheme
from benchmarks.aqlm_layer import layer, timed
from kernels.reference import dequantize


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x4096", help="OUTxIN")
    parser.add_argument("--rows", type=int, default=256, help="rows solved and timed (0: all)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    out, inp = (int(v) for v in args.shape.lower().split("x"))
    W, H = layer(out, inp, args.device)
    rows = args.rows or out
    scale = out / rows
    su, sv = signs(out, inp, 0)

    _, t_rot_w = timed(args.device, rotate_weight, W, su.to(args.device), sv.to(args.device))
    _, t_rot_h = timed(args.device, rotate_hessian, H, sv.to(args.device))
    with torch.device(args.device):
        gp, t_gp = timed(args.device, prepare, H, GPTQConfig(act_order=True))
        grid = UniformScheme(bits=2, group_size=64, sym=False)
        gq, t_gptq = timed(args.device, lambda: gptq(W[:rows], H, grid, GPTQConfig(act_order=True), gp))
        qp, t_qp = timed(args.device, quip_prepare, H, QuipConfig())
        (e8, Wt, Ht), t_e8p = timed(args.device, lambda: quip_rows(W, 0, rows, H, QuipScheme(), QuipConfig(), qp))
        scalar = QuipScheme("scalar", 2, 64, False)
        (sq, _, _), t_scalar = timed(args.device, lambda: quip_rows(W, 0, rows, H, scalar, QuipConfig(), qp))
    from algorithms.quip import rotated

    gptq_err = proxy_error(W[:rows], dequantize(gq).to(W.device), H) / proxy_error(W[:rows], 0 * W[:rows], H)
    total = proxy_error(Wt, 0 * Wt, Ht)
    e8p_err, scalar_err = (proxy_error(Wt, rotated(q).to(W.device), Ht) / total for q in (e8, sq))

    gptq_layer = t_gp + t_gptq * scale
    # quip_rows rotates the whole W, then solves its rows: the rotation counted once, the solve scaled
    e8p_layer = t_qp + t_rot_w + max(0.0, t_e8p - t_rot_w) * scale
    scalar_layer = t_qp + t_rot_w + max(0.0, t_scalar - t_rot_w) * scale
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device {args.device} ({name}), torch threads {torch.get_num_threads()}, layer {out}x{inp}, "
          f"{rows} rows solved, x{scale:g} to the layer (synthetic W and correlated H)")  # fmt: skip
    print(f"  rotation of W / of H             {t_rot_w:7.2f} s / {t_rot_h:.2f} s")
    print(f"  QuIP prepare (rotate H, factor)  {t_qp:7.2f} s   GPTQ prepare {t_gp:.2f} s")
    print(f"  QuIP# E8P layer   {e8p_layer:9.1f} s  error {e8p_err:.4f} of tr(W H W^T), "
          f"{QuipScheme().bits_per_weight(out, inp):.3f} bits")  # fmt: skip
    print(f"  QuIP 2-bit g64    {scalar_layer:9.1f} s  error {scalar_err:.4f}")
    print(f"  GPTQ 2-bit g64    {gptq_layer:9.1f} s  error {gptq_err:.4f}")
    print(f"  ratio QuIP# / GPTQ time {e8p_layer / gptq_layer:.2f}x, error {e8p_err / gptq_err:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
