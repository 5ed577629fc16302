"""Speed and memory of lora-merge against PEFT's `add_weighted_adapter`, side by side, at Llama-7B shapes.

Random rank-16 LoRAs on every projection of a Llama-7B layer (hidden 4096, intermediate 11008: q/k/v/o 4096 x
4096, gate/up 11008 x 4096, down 4096 x 11008), 3 and 10 of them. Each measurement runs in its own process
(wall time and peak RSS of that process):

- lora-merge: `lm.load` every adapter, `lm.merge`, `save`, on `--layers` layers; the per-layer figure is the
  total divided by the layers. Dense methods also once with `svd="exact"` (on `--peft-layers` layers), so the
  table shows how much of the gain is the randomized SVD and how much the rest.
- PEFT: a Llama with `--peft-layers` layers (PEFT needs the base model: its weights are allocated and
  written, as loading them would), the adapters loaded with `load_adapter`, then `add_weighted_adapter` timed
  alone, with `svd_full_matrices=False` (faster than PEFT's default, so the ratios are conservative).

The results are compared module by module on the layers both merged: max over modules of
||dW_ours - dW_peft|| / ||dW_peft||. DARE draws random masks, which differ between the two libraries: its
difference is against lora-merge's own exact path instead.

    pip install peft transformers
    python benchmarks/speed.py                      # 4 layers for lora-merge, 1 for PEFT: about 30 min on 2 cores
    python benchmarks/speed.py --hidden 1024 --intermediate 2752 --layers 2   # a quick look

With CUDA present it also times the batched GPU SVD against a per-module `torch.linalg.svd` loop on the same GPU,
and against the CPU. Results go to --out (JSON) and a table to stdout; see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

MODULES = {"self_attn.q_proj": "hh", "self_attn.k_proj": "hh", "self_attn.v_proj": "hh", "self_attn.o_proj": "hh",
           "mlp.gate_proj": "ih", "mlp.up_proj": "ih", "mlp.down_proj": "hi"}
METHODS = ["svd", "ties_svd", "dare_ties_svd", "cat", "linear"]
DENSE = {"ties_svd", "dare_ties_svd"}


def shape(kind: str, hidden: int, inter: int) -> tuple[int, int]:
    return {"hh": (hidden, hidden), "ih": (inter, hidden), "hi": (hidden, inter)}[kind]


def weights(K: int) -> list[float]:
    return [round(0.3 + 0.2 * (k % 4), 2) for k in range(K)]


def params(method: str) -> dict:
    return {"density": 0.5} if method in DENSE else {}


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; getrusage's ru_maxrss would include the parent's at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- adapters ---------------------------------------------------------------------------------------------
def make_adapters(root: Path, K: int, layers: int, hidden: int, inter: int, rank: int) -> list[Path]:
    """K random PEFT LoRAs (float32) on every projection of `layers` layers; the same values whatever `layers`."""
    import lora_merge as lm
    from lora_merge.adapter import Adapter, LoraWeight
    paths = []
    for k in range(K):
        path = root / f"L{layers}" / f"a{k}"
        paths.append(path)
        if (path / "adapter_model.safetensors").is_file():
            continue
        mods = {}
        for layer in range(layers):
            for i, (name, kind) in enumerate(MODULES.items()):
                out, inp = shape(kind, hidden, inter)
                g = torch.Generator().manual_seed(10_000 * k + 100 * layer + i)
                mods[f"model.layers.{layer}.{name}"] = LoraWeight(
                    A=torch.randn(rank, inp, generator=g) / inp ** 0.5,
                    B=torch.randn(out, rank, generator=g) / rank ** 0.5, scale=2.0)
        config = {"r": rank, "lora_alpha": 2 * rank, "target_modules": sorted({n.split(".")[-1] for n in MODULES}),
                  "base_model_name_or_path": "llama-7b-shapes", "task_type": "CAUSAL_LM"}
        lm.save(Adapter(mods, config, name=f"a{k}"), path, force=True)
    return paths


# ---- workers (one process per measurement) ----------------------------------------------------------------
def worker_ours(paths: list[Path], method: str, out: Path, svd: str | None, device: str) -> dict:
    import lora_merge as lm
    t0 = time.perf_counter()
    adapters = [lm.load(p) for p in paths]
    extra = dict(params(method), **({"svd": svd} if svd else {}))
    t1 = time.perf_counter()
    merged = lm.merge(adapters, weights(len(paths)), method, device=device, **extra)
    t2 = time.perf_counter()
    merged.save(out, force=True)
    t3 = time.perf_counter()
    return {"seconds": t3 - t0, "load": t1 - t0, "merge": t2 - t1, "save": t3 - t2, "peak_rss_mb": peak_rss_mb()}


def worker_peft(paths: list[Path], method: str, out: Path, hidden: int, inter: int, layers: int) -> dict:
    import warnings

    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    warnings.simplefilter("ignore")
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=256)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    for p in model.parameters():           # the base weights are in memory, as after from_pretrained
        p.data.fill_(0.01)
    peft = PeftModel.from_pretrained(model, str(paths[0]), adapter_name="a0")
    for k, p in enumerate(paths[1:], 1):
        peft.load_adapter(str(p), adapter_name=f"a{k}")
    t1 = time.perf_counter()
    kwargs = dict(params(method))
    if method in ("svd", "ties_svd", "dare_ties_svd"):
        kwargs["svd_full_matrices"] = False
    peft.add_weighted_adapter([f"a{k}" for k in range(len(paths))], weights(len(paths)), "merged",
                              combination_type=method, **kwargs)
    t2 = time.perf_counter()
    from peft.tuners.lora import LoraLayer
    deltas = {}
    for name, module in peft.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "merged" in module.lora_A:
            deltas[name + ".A"] = module.lora_A["merged"].weight.detach().contiguous()
            deltas[name + ".B"] = (module.lora_B["merged"].weight * module.scaling["merged"]).detach().contiguous()
    save_file(deltas, str(out))
    return {"seconds": t2 - t1, "setup": t1 - t0, "peak_rss_mb": peak_rss_mb()}


def run_worker(args: list[str], dims: list[str]) -> dict:
    cmd = [sys.executable, __file__, *dims, "--worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- comparison -------------------------------------------------------------------------------------------
def ours_deltas(folder: Path, layers: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    import lora_merge as lm
    a = lm.load(folder)
    return {p: (w.B.float() * w.scale, w.A.float()) for p, w in a.modules.items()
            if int(p.split(".")[2]) < layers}


def max_rel(x: dict, y: dict) -> float:
    worst = 0.0
    for path, (B, A) in y.items():
        Bx, Ax = x[path]
        d_y = (B.double() @ A.double())
        worst = max(worst, float((Bx.double() @ Ax.double() - d_y).norm() / d_y.norm()))
    return worst


def peft_deltas(file: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from safetensors.torch import load_file
    t = load_file(str(file))
    return {k[:-2]: (t[k[:-2] + ".B"], t[k]) for k in t if k.endswith(".A")}


# ---- GPU --------------------------------------------------------------------------------------------------
def gpu_section(hidden: int, inter: int, rank: int, n: int = 8) -> dict:
    """Batched GPU SVD (exact and randomized) against a per-module torch.linalg.svd loop on the same GPU and
    against the CPU path, on n dense deltas of each Llama shape."""
    from lora_merge.linalg import refactor
    out = {"device": torch.cuda.get_device_name(0), "n": n}
    for kind in ("hh", "ih", "hi"):
        m, k = shape(kind, hidden, inter)
        stack = torch.randn(n, m, k, generator=torch.Generator().manual_seed(0))
        row = {}
        g = stack.cuda()
        for mode in ("exact", "randomized"):
            refactor(g[:1], rank, None, mode)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            refactor(g, rank, None, mode)
            torch.cuda.synchronize()
            row[f"gpu_batched_{mode}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(n):
            torch.linalg.svd(g[i], full_matrices=False)
        torch.cuda.synchronize()
        row["gpu_loop_exact"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        refactor(stack[:2], rank, None, "exact")
        row["cpu_exact"] = (time.perf_counter() - t0) * n / 2
        t0 = time.perf_counter()
        refactor(stack, rank, None, "randomized")
        row["cpu_randomized"] = time.perf_counter() - t0
        out[f"{m}x{k}"] = row
    return out


# ---- main -------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=4, help="layers merged by lora-merge")
    ap.add_argument("--peft-layers", type=int, default=1, help="layers merged by PEFT (and by the exact path)")
    ap.add_argument("--adapters", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lora-merge-speed"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/speed_results.json"))
    ap.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        kind, method, out, svd, device, layers, *paths = args.worker
        paths = [Path(p) for p in paths]
        if kind == "ours":
            res = worker_ours(paths, method, Path(out), svd if svd != "-" else None, device)
        else:
            res = worker_peft(paths, method, Path(out), args.hidden, args.intermediate, int(layers))
        print(json.dumps(res))
        return

    dims = ["--hidden", str(args.hidden), "--intermediate", str(args.intermediate)]
    results = {"hidden": args.hidden, "intermediate": args.intermediate, "rank": args.rank, "layers": args.layers,
               "peft_layers": args.peft_layers, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "device": args.device, "rows": []}
    try:
        import peft
        results["peft"] = peft.__version__
    except ImportError:
        args.skip_peft = True
    import lora_merge
    results["lora_merge"] = lora_merge.__version__
    work = args.workdir
    print(f"{'K':>3} {'method':<14} {'ours/layer':>11} {'exact/layer':>12} {'PEFT/layer':>11} {'x PEFT':>8} "
          f"{'diff PEFT':>10} {'diff exact':>11} {'RSS ours':>9} {'RSS PEFT':>9}", flush=True)
    for K in args.adapters:
        full = make_adapters(work / "adapters", K, args.layers, args.hidden, args.intermediate, args.rank)
        part = make_adapters(work / "adapters", K, args.peft_layers, args.hidden, args.intermediate, args.rank)
        for method in args.methods:
            row = {"K": K, "method": method}
            o = run_worker(["ours", method, str(work / "ours"), "-", args.device, str(args.layers),
                            *map(str, full)], dims)
            row["ours_seconds"], row["ours_per_layer"] = o["seconds"], o["seconds"] / args.layers
            row["ours_detail"], row["ours_rss_mb"] = o, o["peak_rss_mb"]
            mine = ours_deltas(work / "ours", args.peft_layers)
            if method in DENSE:
                e = run_worker(["ours", method, str(work / "exact"), "exact", args.device, str(args.peft_layers),
                                *map(str, part)], dims)
                row["exact_per_layer"] = e["seconds"] / args.peft_layers
                row["diff_vs_exact"] = max_rel(mine, ours_deltas(work / "exact", args.peft_layers))
            if not args.skip_peft:
                p = run_worker(["peft", method, str(work / "peft.safetensors"), "-", "cpu", str(args.peft_layers),
                                *map(str, part)], dims)
                row["peft_per_layer"] = p["seconds"] / args.peft_layers
                row["peft_setup_seconds"], row["peft_rss_mb"] = p["setup"], p["peak_rss_mb"]
                row["speedup"] = row["peft_per_layer"] / row["ours_per_layer"]
                if not method.startswith("dare"):
                    row["diff_vs_peft"] = max_rel(mine, peft_deltas(work / "peft.safetensors"))
            results["rows"].append(row)

            def f(key, fmt, row=row):
                return format(row[key], fmt) if key in row else "-"
            print(f"{K:>3} {method:<14} {f('ours_per_layer', '10.2f')}s {f('exact_per_layer', '11.2f')}s "
                  f"{f('peft_per_layer', '10.2f')}s {f('speedup', '7.0f')}x {f('diff_vs_peft', '10.1e')} "
                  f"{f('diff_vs_exact', '11.1e')} {f('ours_rss_mb', '8.0f')}M {f('peft_rss_mb', '8.0f')}M",
                  flush=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    if torch.cuda.is_available():
        results["gpu"] = gpu_section(args.hidden, args.intermediate, args.rank)
        print(json.dumps(results["gpu"], indent=2))
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
