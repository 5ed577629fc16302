"""Merge the example adapters that ship with the repository, with several methods, and save each result.

    python examples/merge_examples.py [OUT_DIR]

Reads adapter files only (the base model is never loaded). Prints one line per merge: the method, the output
ranks, the time, and how far the result is from the exact weighted sum.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import lora_merge as lm

HERE = Path(__file__).resolve().parent


def distance_to_exact(merged: lm.Adapter, exact: lm.Adapter) -> float:
    """Relative Frobenius distance of the merged deltas to the exact weighted sum, over all modules."""
    num = den = 0.0
    for m, w in exact.modules.items():
        d = w.delta()
        num += float((merged.delta(m) - d).norm() ** 2)
        den += float(d.norm() ** 2)
    return (num / den) ** 0.5


def main(out: Path) -> None:
    addition, subtraction, intent = (lm.load(HERE / "adapters" / n) for n in ("addition", "subtraction", "intent"))
    weights = [0.5, 0.5, 0.3]
    exact = lm.merge([addition, subtraction, intent], weights, "sum")
    jobs = {
        "svd": dict(method="svd", rank=8),
        "svd-energy": dict(method="svd", energy=0.9),
        "ties": dict(method="ties", density=0.5),
        "ties_svd": dict(method="ties_svd", density=0.5, rank=8),
        "dare_ties_svd": dict(method="dare_ties_svd", density=0.5, rank=8, seed=0),
        "linear": dict(method="linear"),
    }
    print(f"{'merge':<16} {'ranks':<12} {'seconds':>8} {'dist. to exact sum':>19}")
    for name, params in jobs.items():
        t0 = time.perf_counter()
        merged = lm.merge([addition, subtraction, intent], weights, **params)
        merged.save(out / name, force=True)
        seconds = time.perf_counter() - t0
        ranks = sorted({w.rank for w in merged.modules.values()})
        shown = f"{ranks[0]}..{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])
        print(f"{name:<16} {shown:<12} {seconds:>8.2f} {distance_to_exact(merged, exact):>19.4f}")

    t0 = time.perf_counter()
    arithmetic = lm.compose("addition + subtraction - 0.5*intent", addition=addition, subtraction=subtraction,
                            intent=intent).compress(rank=8)
    arithmetic.save(out / "arithmetic-minus-intent", force=True)
    print(f"{'expression':<16} {'8':<12} {time.perf_counter() - t0:>8.2f}   "
          "addition + subtraction - 0.5*intent")
    print(f"saved {len(jobs) + 1} PEFT adapters under {out}/ (torch {torch.__version__})")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("out"))
