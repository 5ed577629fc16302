"""Multiple-choice accuracy of a (composed) causal LM, as the adapters' own scores.json measures it: each option's
summed log-probability of `" " + option` after `input + "\\nAnswer:"`; the highest wins.

A row's prompt is run once, not once per option: the row becomes ONE sequence, prompt + option 1 + option 2 +
..., with a 4-d attention mask in which every option sees the prompt and its own earlier tokens only, and
position ids that restart after the prompt for each option. Each option's tokens then see exactly what they
would see in `prompt + option` alone, so the scores are the same up to float rounding (`check` measures it
against the one-sequence-per-option way). On these tasks (2-10 options, prompts of 5-70 tokens) that is 2-4x
fewer tokens through the model; the output layer is applied only at the scored positions (`answer_logits`).
"""

from __future__ import annotations

import torch

from lora_merge.model import answer_logits


def _encode(tok, row: dict) -> tuple[list[int], list[list[int]]]:
    prompt = tok(row["input"] + "\nAnswer:")["input_ids"]
    return prompt, [tok(" " + o, add_special_tokens=False)["input_ids"] for o in row["options"]]


@torch.inference_mode()
def scores(model, tok, test: list[dict], *, packed: bool = True, tokens: int = 4096) -> dict[tuple[int, int], float]:
    """{(row, option): summed log-probability}; batches of about `tokens` tokens (padding included)."""
    seqs = []      # (ids, positions, segment per token, [(row, option, predicting positions, targets)])
    for i, row in enumerate(test):
        prompt, options = _encode(tok, row)
        P = len(prompt)
        if not packed:
            for j, o in enumerate(options):
                seqs.append((prompt + o, list(range(P + len(o))), [0] * P + [1] * len(o),
                             [(i, j, list(range(P - 1, P + len(o) - 1)), o)]))
            continue
        ids, pos, seg, score = list(prompt), list(range(P)), [0] * P, []
        for j, o in enumerate(options):
            start = len(ids)
            score.append((i, j, [P - 1] + list(range(start, start + len(o) - 1)), o))
            ids += o
            pos += range(P, P + len(o))
            seg += [j + 1] * len(o)
        seqs.append((ids, pos, seg, score))
    seqs.sort(key=lambda s: len(s[0]))                 # similar lengths together: less padding
    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: dict[tuple[int, int], float] = {}
    start = 0
    while start < len(seqs):
        stop = start + 1
        while stop < len(seqs) and (stop + 1 - start) * len(seqs[stop][0]) <= tokens:
            stop += 1
        chunk = seqs[start:stop]
        start = stop
        B, L = len(chunk), len(chunk[-1][0])
        ids = torch.full((B, L), pad)
        pos = torch.zeros((B, L), dtype=torch.long)
        seg = torch.full((B, L), -1)
        for b, (s, p, g, _) in enumerate(chunk):
            ids[b, :len(s)], pos[b, :len(s)], seg[b, :len(s)] = torch.tensor(s), torch.tensor(p), torch.tensor(g)
        valid = seg >= 0
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        allowed = causal & valid[:, None, :] & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
        allowed |= torch.eye(L, dtype=torch.bool)      # padding rows see themselves (no empty softmax)
        mask = torch.zeros((B, 1, L, L)).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        first = min(min(p[0] for *_, p, _ in c[3]) for c in chunk)
        logits = answer_logits(model, ids.to(dev), mask.to(dev), torch.full((B,), first), L - first,
                               position_ids=pos.to(dev))
        logp = logits.float().log_softmax(-1).cpu()
        for b, (*_, score) in enumerate(chunk):
            for i, j, where, target in score:
                rows = torch.tensor(where) - first
                out[(i, j)] = float(logp[b, rows, torch.tensor(target)].sum())
    return out


def accuracy(model, tok, comp, weights, test: list[dict]) -> float:
    """Share of `test` rows whose answer has the highest score, with `comp` (a Composition) set to `weights`."""
    comp.set_weights(torch.as_tensor(weights, dtype=torch.float32))
    s = scores(model, tok, test)
    right = sum(max(range(len(r["options"])), key=lambda j: s[(i, j)]) == r["answer"] for i, r in enumerate(test))
    return right / len(test)


def check(model, tok, test: list[dict]) -> float:
    """The largest difference between the packed scores and those of one sequence per option."""
    a, b = scores(model, tok, test), scores(model, tok, test, packed=False)
    return max(abs(a[k] - b[k]) for k in b)
