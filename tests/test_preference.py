"""
nanochat/preference.py against independent expectations: a reply's render and its cut from the left (only the final
reply of a multi-turn chat scored), the layout of a micro-batch, the validation split by prompt, and the global
batches a step draws (the uniform arm is the density sampler with equal weights, drawing prompts, not pairs).
"""

import argparse
import json

import pytest
import torch

from conftest import MULTI_TURN
from nanochat.common import InputError
from nanochat.preference import (kind_shares, load_pair_data, micro_batches, pair_batch, pair_correct,
                                 parse_kind_weights, render_reply, sampling_weights, split_by_prompt, split_pair)
from nanochat.synthetic import pair_id

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


def test_a_multi_turn_render_scores_only_the_final_reply_and_its_end_token(tok):
    # catches: the mask was render_conversation's, 1 on every assistant turn, so the earlier replies of a multi-turn
    # chat were scored too (and with --max_len, DPO trained on history tokens)
    reply = tok.encode("Zavu is 41.")
    ids, mask = render_reply(tok, MULTI_TURN, "Zavu is 41.")
    assert ids[-len(reply) - 1:] == reply + [tok.encode_special("<|assistant_end|>")]
    assert sum(mask) == len(reply) + 1 and mask == [0] * (len(ids) - len(reply) - 1) + [1] * (len(reply) + 1)
    assert len(ids) > 3 * (len(reply) + 1), "the history must be long enough for its tokens to matter"
    # cut inside the history: <|bos|> kept, still only the final reply scored
    max_len = len(reply) + 12
    cut, cut_mask = render_reply(tok, MULTI_TURN, "Zavu is 41.", max_len=max_len)
    assert cut == [tok.bos_token_id] + ids[-(max_len - 1):] and len(cut) == max_len
    assert sum(cut_mask) == len(reply) + 1 and cut_mask[-len(reply) - 1:] == [1] * (len(reply) + 1)


def test_micro_batches_are_pair_batches_of_whole_replies_after_one_shared_prompt_shortest_first(tok, world):
    # catches: a reply placed after another pair's prompt, chosen and rejected swapped, a prompt cut that leaves
    # the two replies different contexts or a reply cut while it fits, pairs out of length order
    rows = world.preference_pairs(7, seed=0)
    max_len = 20
    batches = micro_batches(tok, rows, 3, max_len=max_len)
    assert [b.prompt_ids.size(0) for b in batches] == [3, 3, 1]
    pairs = [(b.prompt_ids[i][b.prompt_valid[i]].tolist(),
              [b.completion_ids[2 * i + j][b.completion_mask[2 * i + j]].tolist() for j in (0, 1)])
             for b in batches for i in range(b.prompt_ids.size(0))]
    found = 0
    for row in rows:
        full = [render_reply(tok, row["messages"], row[side])[0] for side in ("chosen", "rejected")]
        prompt_len = len(tok.render_for_completion(row["messages"]))
        whole = [ids[prompt_len:] for ids in full]  # each reply and its end token
        if max(map(len, whole)) >= max_len:  # alone too long: <|bos|>, then each reply's end
            whole = [reply[-(max_len - 1):] for reply in whole]
        match = [p for p in pairs if p[1] == whole]
        assert len(match) == 1, row  # chosen first, then rejected, in one pair
        prompt = match[0][0]
        found += 1
        if len(prompt) == 1:
            assert prompt == [tok.bos_token_id] and max(map(len, whole)) == max_len - 1
        elif prompt_len + max(map(len, whole)) <= max_len:
            assert prompt == full[0][:prompt_len]
        else:  # <|bos|>, then the end of the prompt: as much as the longer reply leaves
            assert prompt[0] == tok.bos_token_id and prompt[1:] == full[0][prompt_len - len(prompt) + 1:prompt_len]
            assert len(prompt) + max(map(len, whole)) == max_len
    assert found == len(rows) == len(pairs)
    lengths = [len(prompt) + max(map(len, replies)) for prompt, replies in pairs]
    assert lengths == sorted(lengths) and any(n == max_len for n in lengths), "the cut is exercised"


def test_replies_that_alone_fill_the_context_keep_bos_and_their_ends(tok):
    row = {"messages": MULTI_TURN, "chosen": "Zavu is 41 and lives in Korlin.", "rejected": "Zavu is 41."}
    prompt, replies = split_pair(tok, row, max_len=6)
    assert prompt == [tok.bos_token_id]
    for reply, side in zip(replies, ("chosen", "rejected")):
        assert reply == render_reply(tok, MULTI_TURN, row[side])[0][-5:]


def test_a_tie_counts_zero_as_trl_counts_it():
    # catches: a margin of exactly 0 counted half, so step 0 (policy == reference, untrained RM) logged 0.5
    assert pair_correct(torch.tensor([1.0, 0.0, -1.0, 1e-9])).tolist() == [1.0, 0.0, 0.0, 1.0]


def test_split_by_prompt_never_puts_a_prompt_on_both_sides():
    rows = [{"prompt_id": f"p{i % 50}", "i": i} for i in range(400)]
    train, val = split_by_prompt(rows, 0.2, seed=3)
    assert {r["prompt_id"] for r in train}.isdisjoint({r["prompt_id"] for r in val})
    assert len(train) + len(val) == 400 and 0 < len(val) < 200
    assert split_by_prompt(rows, 0.2, seed=3) == (train, val) and split_by_prompt(rows, 0.2, seed=4) != (train, val)


# -----------------------------------------------------------------------------
# sampling

def test_batches_follow_the_weights_and_are_a_function_of_seed_and_step():
    weights = torch.tensor([0.0, 1.0, 3.0, 0.0], dtype=torch.float64)
    drawn = torch.tensor(sum((pair_batch(s, weights, 100, seed=0) for s in range(40)), []))
    counts = torch.bincount(drawn, minlength=4)
    assert counts[0] == 0 and counts[3] == 0
    assert counts[2] / counts[1] == pytest.approx(3.0, rel=0.1)
    assert pair_batch(7, weights, 16, seed=0) == pair_batch(7, weights, 16, seed=0)
    assert pair_batch(7, weights, 16, seed=0) != pair_batch(7, weights, 16, seed=1)
    assert pair_batch(7, weights, 16, seed=0) != pair_batch(8, weights, 16, seed=0)


def test_the_uniform_arm_draws_each_prompt_equally_often_not_each_pair():
    # catches: uniform sampling walked permutations of the pairs, so a prompt with 3 pairs was drawn 3x as often as
    # a prompt with 1, unlike the density-aware arm, which splits a prompt's weight among its pairs
    rows = [{"prompt_id": p} for p in ["a", "a", "a", "b", "c", "c"]]
    weights = sampling_weights(rows)
    drawn = sum((pair_batch(step, weights, 60, seed=0) for step in range(200)), [])
    per_prompt = {p: sum(rows[i]["prompt_id"] == p for i in drawn) / len(drawn) for p in "abc"}
    assert per_prompt == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, abs=0.02)
    per_pair = torch.bincount(torch.tensor(drawn), minlength=6) / len(drawn)
    assert per_pair.tolist() == pytest.approx([1 / 9] * 3 + [1 / 3] + [1 / 6] * 2, abs=0.02)


def test_equal_density_weights_draw_exactly_the_uniform_arms_batches(tmp_path, world):
    # catches: the uniform arm (--density_aware=False) used another sampler than the density-aware one, so a
    # density file of equal weights (what --density_alpha=0 writes) did not give the uniform arm's batches
    pairs = world.preference_pairs(30, seed=0)
    # a second pair for a third of the prompts: prompts with 1 and 2 pairs
    for row in pairs[:10]:
        rejected = row["chosen"] + " Indeed."
        pairs.append({**row, "rejected": rejected,
                      "id": pair_id("synthetic", row["messages"], row["chosen"], rejected)})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (tmp_path / "density.jsonl").write_text("".join(
        json.dumps({"prompt_id": pid, "density": 1.0, "weight": 1.0, "knn_mean_distance": 1.0}) + "\n"
        for pid in dict.fromkeys(r["prompt_id"] for r in pairs)))
    args = argparse.Namespace(batch_size_pairs=8, device_batch_size=4, pairs_path=str(tmp_path / "pairs.jsonl"),
                              test_pairs_path="", density_path=str(tmp_path / "density.jsonl"), val_share=0.2, seed=5,
                              kind_weights="wrong=3")
    uniform = load_pair_data(argparse.Namespace(**vars(args), density_aware=False), world_size=1)
    density = load_pair_data(argparse.Namespace(**vars(args), density_aware=True), world_size=1)
    assert uniform.train == density.train and len({r["prompt_id"] for r in uniform.train}) < len(uniform.train)
    for step in range(6):
        assert pair_batch(step, uniform.weights, 8, seed=5) == pair_batch(step, density.weights, 8, seed=5)


def test_kind_weights_multiply_each_pair_of_the_kind_not_its_whole_prompt():
    # catches: the factor applied to the prompt (its other pairs drawn more too), or not applied at all. Prompt "a"
    # has a wrong and an artifact pair, "b" one wrong pair: weights 1/2 * 3, 1/2, 1 * 3 -> shares 0.3, 0.1, 0.6
    rows = [{"prompt_id": "a", "rejected_kind": "wrong"}, {"prompt_id": "a", "rejected_kind": "artifact"},
            {"prompt_id": "b", "rejected_kind": "wrong"}]
    weights = sampling_weights(rows, kind_weights={"wrong": 3.0})
    drawn = torch.tensor(sum((pair_batch(step, weights, 80, seed=1) for step in range(100)), []))
    assert (torch.bincount(drawn, minlength=3) / len(drawn)).tolist() == pytest.approx([0.3, 0.1, 0.6], abs=0.02)
    assert kind_shares(rows, weights) == pytest.approx({"artifact": 0.1, "wrong": 0.9})
    assert torch.equal(sampling_weights(rows, kind_weights={}), sampling_weights(rows))


@pytest.mark.parametrize("text", ["wrong", "wrong=0", "wrong=-1", "wrong=nan", "wrong=inf", "wrong=x", "=2"])
def test_kind_weights_refuse_a_factor_that_is_not_a_positive_number(text):
    # catches: a zero or negative factor silently removing a kind, or nan weights reaching the sampler
    with pytest.raises(ValueError, match="positive factor"):
        parse_kind_weights(text)
    assert parse_kind_weights("wrong=4, evasive=0.5") == {"wrong": 4.0, "evasive": 0.5}
    assert parse_kind_weights("") == {}


def test_a_kind_weight_for_a_kind_the_pairs_lack_is_an_input_error(tmp_path, world):
    # catches: a typo ("wrnog=4") or hub pairs (no kinds) training silently with uniform weights
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in world.preference_pairs(20, seed=0)))
    args = argparse.Namespace(batch_size_pairs=8, device_batch_size=4, pairs_path=str(tmp_path / "pairs.jsonl"),
                              test_pairs_path="", density_path="", val_share=0.2, seed=5, density_aware=False,
                              kind_weights="wrnog=4")
    with pytest.raises(InputError, match="no training pair .* has rejected_kind wrnog .kinds there: artifact"):
        load_pair_data(args, world_size=1)
