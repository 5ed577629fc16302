"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

For a linear layer, the weight that best reproduces every input model's outputs on its own data,
min_W sum_i ||X_i W^T - X_i W_i^T||^2, is W = (sum_i W_i G_i)(sum_i G_i)^-1 with G_i = X_i^T X_i, the Gram
matrix of the layer's inputs on input i's data. The paper shrinks the Grams' off-diagonal entries by `alpha`
(G~ = alpha G + (1 - alpha) diag(G); 1 is plain RegMean, 0 a per-input-feature weighted average). Merge
weights l_i scale the Grams (a weighted regression; with equal Grams the merge is sum_i l_i W_i / sum_i l_i).

For LoRAs on one base, W_i = W_0 + s_i B_i A_i and the base cancels: the merged update is
sum_i (l_i s_i B_i)(A_i G~_i S^-1) with S = sum_i l_i G~_i. That is exactly a LoRA of rank sum_i r_i: its
factors are [l_1 s_1 B_1 ... l_k s_k B_k] and [A_1 G~_1 S^-1; ...; A_k G~_k S^-1], so no dense out x in matrix is
formed; `rank` / `energy` truncate it by the factored SVD. A module that an input lacks takes no part in it
(its Gram is that of the input's own adapted modules only).
"""

from __future__ import annotations

import torch

from ..adapter import LoraWeight
from ..errors import MethodError
from .registry import register

URL = "https://arxiv.org/abs/2212.09849"


def shrink(G: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha G + (1 - alpha) diag(G)."""
    return alpha * G + (1.0 - alpha) * torch.diag(torch.diagonal(G))


def regmean_factors(Bs: list[torch.Tensor], As: list[torch.Tensor], grams: list[torch.Tensor],
                    weights: list[float], alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B, A) of sum_i w_i B_i A_i G~_i (sum_i w_i G~_i)^-1; solved in float64."""
    G = [shrink(g.to(a.device, torch.float64), alpha) for g, a in zip(grams, As)]   # Grams are read to the CPU
    S = sum(w * g for w, g in zip(weights, G))
    rhs = torch.cat([g @ a.double().T for g, a in zip(G, As)], 1)        # S^-1 G_i A_i^T, all at once
    try:
        X = torch.linalg.solve(S, rhs)
    except RuntimeError:                                                  # singular (few tokens, alpha = 1)
        X = torch.linalg.pinv(S, hermitian=True) @ rhs
    A = X.T.float()
    B = torch.cat([w * b.float() for w, b in zip(weights, Bs)], 1)
    return B, A


def regmean(path: str, entries: list, stats: list, *, alpha: float = 0.9) -> LoraWeight:
    """One module's RegMean merge: `entries` the module's (weight, LoraWeight, adapter), `stats` the inputs'
    Gram matrices (`lora_merge.fisher.Fisher` with `gram`, or a mapping module path -> Gram)."""
    if not 0.0 <= alpha <= 1.0:
        raise MethodError(f"regmean: alpha must be in [0, 1], got {alpha}", key="alpha")
    grams = []
    for (c, x, a), g in zip(entries, stats):
        if c <= 0:
            raise MethodError(f"regmean: the weight of '{a.name}' is {c}; RegMean is a weighted regression and "
                              "needs positive weights", key="weights")
        G = g.get(path) if hasattr(g, "get") else None
        if G is None:
            raise MethodError(f"regmean: the Gram matrices of adapter '{a.name}' have no module {path}; were they "
                              "estimated for this adapter?", module=path, file=a.source)
        if tuple(G.shape) != (x.shape[1], x.shape[1]):
            raise MethodError(f"regmean: the Gram of adapter '{a.name}' at {path} is {tuple(G.shape)}, but the "
                              f"module's input has {x.shape[1]} features", module=path, file=a.source)
        grams.append(G)
    B, A = regmean_factors([x.B.float() * x.scale for _, x, _ in entries], [x.A for _, x, _ in entries], grams,
                           [c for c, _, _ in entries], alpha)
    return LoraWeight(A=A, B=B, scale=1.0)


register("regmean", family="data", needs="gram", op=regmean, url=URL,
         summary="RegMean: the least-squares merge of each linear layer on the inputs' data (Gram matrices); "
                 "exact and factored, rank = the sum of the input ranks")
