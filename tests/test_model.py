"""`model.answer_logits`: the logits of a right-padded batch at each row's answer positions, equal to the full
logits gathered there, with the output layer applied only at those positions (and whole when it is adapted)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_adapter, tiny_llama

import lora_merge as lm
from lora_merge.model import Composition, answer_logits


def batch(seed: int = 0):
    """Rows of 3-9 tokens, right-padded, and each row's first answer position (prompt length - 1)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 9, 5, 7]
    T = max(lengths)
    ids = torch.randint(3, 60, (len(lengths), T), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    starts = torch.tensor([1, 6, 0, 3])
    return ids, mask, starts


def gathered(model, ids, mask, starts, width):
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
    index = (starts.view(-1, 1) + torch.arange(width)).clamp(max=ids.shape[1] - 1)
    return full.gather(1, index.unsqueeze(-1).expand(-1, -1, full.shape[-1]))


@pytest.mark.parametrize("width", [1, 3, 12])
def test_answer_logits_are_the_full_logits_at_the_answer_positions(width):
    model, (ids, mask, starts) = tiny_llama(), batch()
    calls = []
    model.lm_head.register_forward_hook(lambda mod, args, out: calls.append(tuple(args[0].shape)))
    with torch.no_grad():
        got = answer_logits(model, ids, mask, starts, width)
    assert calls[0] == (4, width, model.config.hidden_size)           # the output layer saw only those positions
    assert got.shape == (4, width, model.config.vocab_size)
    assert torch.allclose(got, gathered(model, ids, mask, starts, width), rtol=0, atol=1e-5)
    assert not model.lm_head._forward_pre_hooks                          # the gathering hook is gone


def test_an_adapted_output_layer_keeps_its_whole_input(tmp_path):
    model, (ids, mask, starts) = tiny_llama(), batch(1)
    comp = Composition(model, [lm.load(make_adapter(tmp_path / "head", targets=("lm_head", "q_proj"), seed=3))],
                       "delta")
    comp.set_weights([1.0])
    seen = []
    model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            got = answer_logits(model, ids, mask, starts, 2)
        assert seen[0] == (4, ids.shape[1], model.config.hidden_size)
        assert torch.allclose(got, gathered(model, ids, mask, starts, 2), rtol=0, atol=1e-5)
    finally:
        comp.detach()
