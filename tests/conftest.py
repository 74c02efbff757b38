"""Shared fixtures: tiny models with every weight random (zero-initialised projections would hide bugs)."""

import pytest
import torch

from nanochat.gpt import GPT, config_from_depth


def make_tiny_model(seed=0, vocab_size=97, sequence_len=64, n_kv_head=2, randomize=True):
    torch.manual_seed(seed)
    config = config_from_depth(2, vocab_size, sequence_len, n_embd=64, n_head=4, n_kv_head=n_kv_head,
                               verbose=False)
    model = GPT(config)
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture
def tiny_model():
    return make_tiny_model()
