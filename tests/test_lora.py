"""
LoRA: a fresh adapter is the base model, merging turns the adapted model into a plain GPT checkpoint computing the
same function, disabling the adapters gives the base model back, only the adapters train, r = 0 is a full
fine-tune, and the adapter state round-trips.
"""

import copy

import pytest
import torch
import torch.nn as nn

from conftest import make_tiny_model
from nanochat.checkpoint import load_model, save_checkpoint
from nanochat.common import InputError
from nanochat.engine import Engine
from nanochat.gpt import GPT
from nanochat.lora import (LoRALinear, adapters_disabled, apply_lora, load_lora_state_dict, lora_state_dict,
                           merge_lora)
from nanochat.tokenizer import META_FILE, MODEL_FILE

IDX = torch.randint(0, 97, (3, 13), generator=torch.Generator().manual_seed(1))


def train(model, params, steps=5, seed=0, lr=0.05):
    """A few AdamW steps on random tokens: enough to make the adapters clearly non-zero."""
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 97, (4, 17), generator=g)
        model(idx[:, :-1], idx[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def adapted(r=4, alpha=8):
    """A tiny model with trained adapters (alpha/r = 2, so a forgotten scale shows), and its base before wrapping."""
    model = make_tiny_model()
    base = copy.deepcopy(model)
    torch.manual_seed(0)
    train(model, apply_lora(model, r, alpha))
    return model, base


@torch.no_grad()
def logits(model, idx=IDX):
    return model(idx)


def test_fresh_adapter_is_exactly_the_base_model():
    # catches: B initialised at random like A (a fresh adapter would start training away from the base model)
    model = make_tiny_model()
    expected = logits(model)
    apply_lora(model, r=4, alpha=8)
    assert torch.equal(logits(model), expected)
    layer = model.blocks[0].attn.c_q
    # catches: A initialised at zero too (B's gradient is then zero forever: the adapter never learns)
    assert isinstance(layer, LoRALinear) and layer.lora_A.abs().min() > 0 and not layer.lora_B.any()


def test_merge_reproduces_the_adapted_model_as_a_plain_gpt_checkpoint(tmp_path):
    model, base = adapted()
    expected = logits(model)
    # the adapters must have moved, or the merge checks below would pass with a merge that folds in nothing
    assert (expected - logits(base)).abs().max() > 0.1
    merge_lora(model)
    # catches: the merge forgetting alpha/r, or folding A^T B^T in the wrong orientation
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    # catches: wrappers (or lora_A/lora_B keys) left behind, which a plain GPT's strict load refuses
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert list(model.state_dict()) == list(GPT(model.config).state_dict())
    assert all(p.requires_grad for p in model.parameters())
    tok_dir = tmp_path / "tokenizer"  # save_checkpoint only copies and fingerprints the tokenizer's two files
    tok_dir.mkdir()
    for name in (MODEL_FILE, META_FILE):
        (tok_dir / name).write_text("stand-in")
    save_checkpoint(tmp_path / "star", model, step=3, tokenizer_dir=tok_dir)
    loaded, _ = load_model(tmp_path / "star")
    assert torch.equal(logits(loaded), logits(model))


def test_adapters_disabled_computes_the_base_model_and_comes_back():
    model, base = adapted()
    expected = logits(model)
    with adapters_disabled(model):
        # catches: the forward ignoring the flag (the "reference" would be the policy: DPO's loss stuck at log 2)
        assert torch.equal(logits(model), logits(base))
    # catches: the flag left set after the context (the policy would silently train as the base model)
    assert torch.equal(logits(model), expected)
    with pytest.raises(RuntimeError), adapters_disabled(model):
        raise RuntimeError("a failed reference pass")
    assert torch.equal(logits(model), expected)


def test_only_the_adapters_train():
    model = make_tiny_model()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    params = apply_lora(model, r=4, alpha=8)
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    # catches: forgetting to freeze the embedding / LM head (they would be returned and trained with the adapters)
    assert {id(p) for p in params} == {id(p) for p in lora} == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(lora) == 2 * 2 * 6  # 2 layers x (c_q, c_k, c_v, attn c_proj, c_fc, mlp c_proj) x (A, B)
    # a generic loop that optimises whatever requires grad must leave every base weight as it was
    train(model, [p for p in model.parameters() if p.requires_grad])
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert all(state[k].any() for k in state if k.endswith("lora_B"))


def test_scale_alpha_over_r_and_the_bias_on_a_hand_computed_layer():
    linear = nn.Linear(3, 2, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]]))
        linear.bias.copy_(torch.tensor([0.5, -0.5]))
    layer = LoRALinear(linear, r=2, alpha=6)  # scale 3
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
        layer.lora_B.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # base: [1 + 6 + 0.5, -2 + 3 - 0.5] = [7.5, 0.5]; A x = [3, 3]; B A x = [3, 6]; times 3 = [9, 18]
    # catches: the scale dropped or inverted (r/alpha), or the base layer's bias lost in the wrap
    torch.testing.assert_close(layer(x), torch.tensor([[16.5, 18.5]]))
    assert LoRALinear(nn.Linear(3, 2), r=4).scale == 1.0  # alpha defaults to r


def test_dropout_acts_only_in_training_mode():
    model = make_tiny_model()
    torch.manual_seed(0)
    train(model, apply_lora(model, r=4, dropout=0.5))
    # catches: dropout applied in eval mode (sampling and evaluation would be noisy, and differ from the merge), e.g.
    # the wrappers' new Dropout modules left in training mode inside a model already in eval mode
    assert torch.equal(logits(model), logits(model))
    model.train()
    assert not torch.equal(logits(model), logits(model))


def test_rank_zero_is_a_full_fine_tune():
    model = make_tiny_model()
    expected = logits(model)
    params = apply_lora(model, r=0)
    # catches: r = 0 wrapping or freezing anything (the full fine-tune would train nothing, or a rank-0 no-op)
    assert [id(p) for p in params] == [id(p) for p in model.parameters()]
    assert all(p.requires_grad for p in params) and torch.equal(logits(model), expected)
    assert merge_lora(model) is model and torch.equal(logits(model), expected)
    # catches: disabling nothing silently, which would make a DPO reference equal to its policy
    with pytest.raises(ValueError, match="no LoRA adapters"), adapters_disabled(model):
        pass


def test_targets_are_checked_and_respected():
    model = make_tiny_model()
    apply_lora(model, r=2, targets=("c_q", "c_fc"))
    wrapped = sorted(name for name, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == ["blocks.0.attn.c_q", "blocks.0.mlp.c_fc", "blocks.1.attn.c_q", "blocks.1.mlp.c_fc"]
    # catches: a typo in a target silently training fewer matrices than asked for
    with pytest.raises(ValueError, match="c_qq"):
        apply_lora(make_tiny_model(), r=2, targets=("c_qq",))


def test_lora_state_dict_round_trip_and_mismatch_errors():
    model, _ = adapted()
    state = lora_state_dict(model)
    assert state and all(k.endswith((".lora_A", ".lora_B")) for k in state)  # small: no base weights
    fresh = make_tiny_model()
    apply_lora(fresh, r=4, alpha=8)
    load_lora_state_dict(fresh, state)
    assert torch.equal(logits(fresh), logits(model))
    # catches: a non-strict load that silently leaves a renamed adapter at its fresh value
    renamed = dict(state)
    renamed["blocks.0.attn.c_q.lora_X"] = renamed.pop("blocks.0.attn.c_q.lora_A")
    with pytest.raises(InputError, match=r"missing \['blocks.0.attn.c_q.lora_A'\].*lora_X"):
        load_lora_state_dict(fresh, renamed)
    other_rank = make_tiny_model()
    apply_lora(other_rank, r=2, alpha=8)
    with pytest.raises(InputError, match="blocks.0.attn.c_q.lora_A has shape"):
        load_lora_state_dict(other_rank, state)


def test_kv_cache_generation_of_the_adapted_model_equals_the_merged_model():
    model, base = adapted()
    prompts = [[1, 5, 9], [2, 4, 6, 8, 10, 12], [7]]  # different lengths: left padding and the cache's masks
    tokens = Engine(model).generate(prompts, max_new_tokens=12, temperature=0.0).tokens
    # the adapters must change what is generated, or the comparison below could not tell them missing
    assert not torch.equal(tokens, Engine(base).generate(prompts, max_new_tokens=12, temperature=0.0).tokens)
    merged = merge_lora(copy.deepcopy(model))
    assert torch.equal(tokens, Engine(merged).generate(prompts, max_new_tokens=12, temperature=0.0).tokens)
