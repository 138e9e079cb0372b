"""Error of every backend against float64, per input precision, at temperature 0.01.

The judge is the materialised reference evaluated in float64 on the same (rounded) inputs, so
the table shows what each backend's arithmetic adds, not the rounding of the inputs. Errors are
max |got - float64| / max |float64| for the output and the three gradients; the reference
backend's own row (materialised at the input precision) is the yardstick.

    python -m benchmarks.accuracy_correspondence_warp --device cpu
"""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

import cocos_kernels as ck

PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANTITIES = ("out", "grad query", "grad key", "grad value")


def relative_errors(backend: str, dtype: torch.dtype, inputs64, grad64, temperature: float) -> list[float]:
    rounded = [t.to(dtype).double().requires_grad_() for t in inputs64]
    expected = ck.reference.correspondence_warp(*rounded, temperature)
    expected.backward(grad64)
    device = inputs64[0].device
    mine = [t.to(dtype).requires_grad_() for t in inputs64]
    out = ck.correspondence_warp(*mine, temperature, backend=backend)
    out.backward(grad64.to(device, dtype))
    pairs = zip([out, *(t.grad for t in mine)], [expected, *(t.grad for t in rounded)])
    return [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in pairs]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="device of the inputs (cpu or cuda)")
    parser.add_argument("--backends", nargs="+", default=None, help="backends to judge (default: every one that runs)")
    parser.add_argument("--side", type=int, default=24, help="query and key grid side (default 24)")
    parser.add_argument("--channels", type=int, default=256, help="feature channels C (default 256)")
    parser.add_argument("--value-channels", type=int, default=3, help="value channels Cv (default 3)")
    parser.add_argument("--temperature", type=float, default=0.01, help="softmax temperature (default 0.01)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    shape = (2, args.channels, args.side, args.side)
    inputs64 = [torch.randn(shape, generator=g, dtype=torch.float64).to(device) for _ in range(2)]
    inputs64.append(torch.randn((2, args.value_channels, args.side, args.side), generator=g, dtype=torch.float64).to(device))
    grad64 = torch.randn((2, args.value_channels, args.side, args.side), generator=g, dtype=torch.float64).to(device)

    lines = [
        f"Error against float64 (max abs error / max abs value), temperature {args.temperature}, "
        f"B=2, C={args.channels}, Cv={args.value_channels}, {args.side}x{args.side} grids, device {args.device}, "
        f"{datetime.date.today()}.",
        "",
        "| backend | precision | " + " | ".join(QUANTITIES) + " |",
        "|---|---|" + "---|" * len(QUANTITIES),
    ]
    for backend in args.backends or list(ck.BACKENDS):
        for name, dtype in PRECISIONS.items():
            reason = ck.BACKENDS[backend].refusal(device, dtype)
            if reason is not None:
                lines.append(f"| {backend} | {name} | refused: {reason} |" + " |" * (len(QUANTITIES) - 1))
                continue
            errors = relative_errors(backend, dtype, inputs64, grad64, args.temperature)
            lines.append(f"| {backend} | {name} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return table


if __name__ == "__main__":
    main()
