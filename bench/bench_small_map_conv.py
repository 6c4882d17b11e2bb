"""SmallMapConv2d (pipeline/models/blocks.py), one layer at a time: torch's convolution kernel vs
the matrix-product route, forward + backward, with and without a gradient penalty's double
backward, in bf16 autocast and fp32. The layers are those of StarGAN's D at 128 px (the paper's
widths, 64 -> 2048 channels) at the batches the engine gives them (16 real + 16 fake, 32
interpolates; Defect-GAN: 64 and 32), plus layers the route leaves to the kernel.

    .venv/bin/python bench/bench_small_map_conv.py [--repeats 5]

Prints one table; the "route" column says which path forward() takes by default (the speed of
the other one is shown for the ablation).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.models.blocks import SmallMapConv2d, set_small_map_gemm  # noqa: E402

# (in channels, out channels, kernel, stride, padding, input px, batch)
LAYERS = [
    (1024, 2048, 4, 2, 1, 4, 16), (1024, 2048, 4, 2, 1, 4, 32), (1024, 2048, 4, 2, 1, 4, 64),
    (512, 1024, 4, 2, 1, 8, 16), (512, 1024, 4, 2, 1, 8, 32),
    (256, 512, 4, 2, 1, 16, 16),            # 8x8 output: left to the kernel
    (2048, 1, 3, 1, 1, 2, 32),              # the source head: a small weight, left to the kernel
]


def seconds(layer: SmallMapConv2d, x: torch.Tensor, bf16: bool, penalty: bool, repeats: int) -> float:
    """Best of `repeats` (after one warm-up) forward + backward passes of a squared-output loss;
    with `penalty`, plus the squared input gradient (create_graph: the double backward)."""
    best = float("inf")
    for i in range(repeats + 1):
        inp = x.clone().requires_grad_(penalty)
        layer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = layer(inp).float().square().mean()
        if penalty:
            grad, = torch.autograd.grad(loss, inp, create_graph=True)
            loss = loss + grad.square().sum()
        loss.backward()
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"# SmallMapConv2d: kernel vs matrix product, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"command: `{' '.join([Path(sys.executable).name, *sys.argv])}`\n")
    print("| layer | input | batch | route | precision | pass | kernel ms | matrix product ms | kernel / product |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c_in, c_out, k, s, pad, px, batch in LAYERS:
        layer = SmallMapConv2d(c_in, c_out, k, s, pad)
        x = torch.randn(batch, c_in, px, px)
        route = "product" if layer.routes_to_gemm(x) else "kernel"
        for bf16 in (True, False):
            for penalty in (False, True):
                set_small_map_gemm(layer, False)
                kernel = seconds(layer, x, bf16, penalty, args.repeats)
                set_small_map_gemm(layer, True)
                layer.MIN_GEMM_WEIGHT, layer.MAX_GEMM_POSITIONS = 0, 10 ** 9   # force it, for the comparison
                product = seconds(layer, x, bf16, penalty, args.repeats)
                del layer.MIN_GEMM_WEIGHT, layer.MAX_GEMM_POSITIONS
                print(f"| {c_in}->{c_out} {k}x{k} s{s} | {px}x{px} | {batch} | {route} | "
                      f"{'bf16' if bf16 else 'fp32'} | {'fwd+bwd+penalty' if penalty else 'fwd+bwd'} | "
                      f"{kernel * 1e3:.1f} | {product * 1e3:.1f} | {kernel / product:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
