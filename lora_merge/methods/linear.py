"""Sums: the exact weighted sum (`sum`, `cat`, `svd`) and the factor-wise ones (`linear`, `pem`)."""

from __future__ import annotations

from .prune import weighted_sum
from .registry import register

PEM_URL = "https://arxiv.org/abs/2306.14870"

register("sum", family="exact",
         summary="exact weighted sum of the deltas, kept exact by concatenating factors (rank = sum of ranks); "
                 "with rank/energy, its best low-rank approximation via a factored SVD")
register("cat", family="exact",
         summary="PEFT's cat: the exact weighted sum by concatenation (rank = sum of ranks)")
register("svd", family="exact", default_rank="max",
         summary="PEFT's svd: the weighted sum truncated to `rank` (default: the largest input rank), computed "
                 "by QR of the stacked factors and an SVD of the small core, never the dense delta")
register("linear", family="factor", op=weighted_sum,
         summary="PEFT's linear: A = sum sign(w s) sqrt|w s| A_i, B = sum sqrt|w s| B_i; cross terms B_i A_j "
                 "by design (equal ranks; use svd otherwise)")
register("pem", family="factor", op=weighted_sum, split="pem", url=PEM_URL,
         summary="PEM (Zhang et al., 2023) factor-wise arithmetic: A = sum |w_i| A_i, B = sum w_i B_i (negation "
                 "negates one factor; scale folded as sqrt(s) into each); equal ranks")
register("lorahub_factor", family="factor", op=weighted_sum, split="lorahub",
         url="https://arxiv.org/abs/2307.13269",
         summary="LoraHub's composition: A = sum w_i sqrt(s_i) A_i, B = sum w_i sqrt(s_i) B_i, so the update is "
                 "(sum w_i B_i)(sum w_i A_i) times s for equal scales; equal ranks")
