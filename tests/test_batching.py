"""
nanochat/batching.py against hand-written expectations: padding on either side, the targets rule, the one
truncation rule (it keeps <|bos|> and the end, for every stage that cuts), and the ignore index the model skips.
"""

import pytest
import torch

from conftest import make_tiny_model
from nanochat import density
from nanochat.batching import IGNORE_INDEX, collate_right, collate_targets, cut_left, pad_left, pad_right
from nanochat.preference import render_reply
from nanochat.training import evaluate_loss

BOS = 100


def test_pad_right_and_pad_left_place_the_tokens_and_mark_them():
    ids, valid = pad_right([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert valid.tolist() == [[True, True, True], [True, False, False]]
    ids, valid = pad_right([[1, 2], [3]], pad_id=9, width=4, rows=3)  # an extra row is padding only
    assert ids.tolist() == [[1, 2, 9, 9], [3, 9, 9, 9], [9, 9, 9, 9]]
    assert valid.sum(1).tolist() == [2, 1, 0]
    ids, valid = pad_left([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert valid.tolist() == [[True, True, True], [False, False, True]]
    assert ids.dtype == torch.long and valid.dtype == torch.bool


def test_targets_are_the_next_token_where_its_mask_is_set():
    rendered = [([BOS, 5, 6, 7], [0, 0, 1, 1]),  # a prompt token, then a reply of two
                ([BOS, 8], [0, 1])]
    inputs, targets = collate_targets(rendered, pad_id=9)
    assert inputs.tolist() == [[BOS, 5, 6], [BOS, 9, 9]]
    assert targets.tolist() == [[-1, 6, 7], [8, -1, -1]]
    # no mask: every next token is a target (packed pretraining rows); width and rows fixed by the caller
    inputs, targets = collate_targets([([BOS, 5, BOS, 6], None)], pad_id=BOS, width=5, rows=2)
    assert inputs.tolist() == [[BOS, 5, BOS, BOS, BOS], [BOS] * 5]
    assert targets.tolist() == [[5, BOS, 6, -1, -1], [-1] * 5]


def test_collate_right_gives_each_rows_last_real_position():
    ids, last = collate_right([[1, 2, 3], [4], [5, 6]], pad_id=7)
    assert ids.tolist() == [[1, 2, 3], [4, 7, 7], [5, 6, 7]] and last.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="empty"):
        collate_right([[1], []])


def test_cut_left_keeps_bos_and_the_end():
    ids, mask = [BOS, 1, 2, 3, 4, 5], [0, 0, 0, 1, 1, 1]
    assert cut_left(ids, 4) == [BOS, 3, 4, 5] and cut_left(mask, 4) == [0, 1, 1, 1]
    assert cut_left(ids, 1) == [BOS]
    assert cut_left(ids, 6) == ids and cut_left(ids, 0) == ids and cut_left(ids, None) == ids


def test_every_stage_that_cuts_keeps_bos_and_the_end(tok):
    # the reward model's and DPO's renders, and density's prompts (GRPO's prompts are cut by the same cut_left)
    messages = [{"role": "user", "content": "What colour does Zavu like? " * 4}]
    full, full_mask = render_reply(tok, messages, "Zavu likes red.")
    ids, mask = render_reply(tok, messages, "Zavu likes red.", max_len=9)
    assert ids == [tok.bos_token_id] + full[-8:] and mask == [0] + full_mask[-8:]
    prompt = tok.render_for_completion(messages)
    assert density.render_prompts(tok, [messages], 6) == [[tok.bos_token_id] + prompt[-5:]]
    assert prompt[-1] == tok.encode_special("<|assistant_start|>")


def test_the_model_and_the_token_counts_skip_the_ignore_index():
    assert IGNORE_INDEX == -1
    model = make_tiny_model()
    inputs, targets = collate_targets([([0, 5, 6, 7], [0, 0, 1, 1]), ([0, 8], [0, 1])], pad_id=0)
    per_token = model(inputs, targets, loss_reduction="none")
    assert (per_token[targets == IGNORE_INDEX] == 0).all()
    # by hand: -log softmax of the three supervised targets, averaged over those three only
    logp = model(inputs).log_softmax(-1)
    expected = -(logp[0, 1, 6] + logp[0, 2, 7] + logp[1, 0, 8]) / 3
    assert evaluate_loss(model, [(inputs, targets)]) == pytest.approx(expected.item(), abs=1e-5)
