"""
nanochat/preference.py against independent expectations: a reply's render and its cut from the left, the layout
of a micro-batch, the validation split by prompt, and the global batches a step draws.
"""

import pytest
import torch

from nanochat.preference import micro_batches, pair_batch, render_reply, split_by_prompt


def test_render_reply_ends_with_the_end_token_and_cuts_from_the_left(tok):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    ids, mask = render_reply(tok, messages, "2 + 3 = 5.")
    reply = tok.encode("2 + 3 = 5.")
    assert ids[-1] == tok.encode_special("<|assistant_end|>")
    assert ids[-len(reply) - 1:-1] == reply and ids[-len(reply) - 2] == tok.encode_special("<|assistant_start|>")
    assert mask == [0] * (len(ids) - len(reply) - 1) + [1] * (len(reply) + 1)
    cut, cut_mask = render_reply(tok, messages, "2 + 3 = 5.", max_len=8)
    assert cut == [tok.bos_token_id] + ids[-7:] and cut_mask == [0] + mask[-7:]
    assert render_reply(tok, messages, "2 + 3 = 5.", max_len=len(ids)) == (ids, mask)


def test_micro_batches_hold_chosen_renders_then_their_rejected_renders_shortest_first(tok, world):
    rows = world.preference_pairs(7, seed=0)
    batches = micro_batches(tok, rows, 3, max_len=20)
    assert [len(batch) for batch in batches] == [6, 6, 2]
    pairs = [[batch[i], batch[len(batch) // 2 + i]] for batch in batches for i in range(len(batch) // 2)]
    expected = [[render_reply(tok, r["messages"], r[side], 20) for side in ("chosen", "rejected")] for r in rows]
    assert sorted(pairs) == sorted(expected)
    longest = [max(len(chosen[0]), len(rejected[0])) for chosen, rejected in pairs]
    assert longest == sorted(longest)


def test_split_by_prompt_never_puts_a_prompt_on_both_sides():
    rows = [{"prompt_id": f"p{i % 50}", "i": i} for i in range(400)]
    train, val = split_by_prompt(rows, 0.2, seed=3)
    assert {r["prompt_id"] for r in train}.isdisjoint({r["prompt_id"] for r in val})
    assert len(train) + len(val) == 400 and 0 < len(val) < 200
    assert split_by_prompt(rows, 0.2, seed=3) == (train, val) and split_by_prompt(rows, 0.2, seed=4) != (train, val)


def test_uniform_batches_walk_seeded_epochs_and_density_batches_follow_the_weights():
    batches = [pair_batch(step, 10, 4, seed=0) for step in range(5)]
    flat = sum(batches, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a fresh permutation per epoch
    assert pair_batch(3, 10, 4, seed=0) == batches[3] and pair_batch(3, 10, 4, seed=1) != batches[3]
    weights = torch.tensor([0.0, 1.0, 3.0, 0.0], dtype=torch.float64)
    drawn = torch.tensor(sum((pair_batch(s, 4, 100, seed=0, weights=weights) for s in range(40)), []))
    counts = torch.bincount(drawn, minlength=4)
    assert counts[0] == 0 and counts[3] == 0
    assert counts[2] / counts[1] == pytest.approx(3.0, rel=0.1)
    assert pair_batch(7, 4, 16, seed=0, weights=weights) == pair_batch(7, 4, 16, seed=0, weights=weights)
