import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from nanochat.gpt import GPT, config_from_depth, lr_multiplier
from nanochat.muon import orthogonalize


def test_depth_dial_derives_width_and_heads():
    c = config_from_depth(4, 4096, 512, verbose=False)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head) == (4, 256, 4, 4)
    c = config_from_depth(20, 65536, 2048, verbose=False)
    assert (c.n_embd, c.n_head) == (1280, 20)
    with pytest.raises(ValueError):
        config_from_depth(2, 100, 32, n_embd=64, n_head=3)


def test_loss_matches_hand_computed_cross_entropy(tiny_model):
    idx = torch.randint(0, 97, (2, 9))
    targets = torch.randint(0, 97, (2, 9))
    targets[0, :4] = -1  # ignored positions
    logits = tiny_model(idx)
    # independent reference: -log softmax at the target, averaged over non-ignored positions
    logp = logits.log_softmax(-1)
    per_token = torch.zeros(2, 9)
    for b in range(2):
        for t in range(9):
            if targets[b, t] >= 0:
                per_token[b, t] = -logp[b, t, targets[b, t]]
    n = (targets >= 0).sum()
    assert torch.allclose(tiny_model(idx, targets), per_token.sum() / n, atol=1e-5)
    assert torch.allclose(tiny_model(idx, targets, loss_reduction="sum"), per_token.sum(), atol=1e-4)
    assert torch.allclose(tiny_model(idx, targets, loss_reduction="none"), per_token, atol=1e-5)


def test_untrained_loss_is_log_vocab():
    model = make_tiny_model(randomize=False)  # real init: tiny head, zero projections -> near-uniform logits
    idx = torch.randint(0, 97, (2, 16))
    assert abs(model(idx, idx).item() - math.log(97)) < 0.05


def test_causality_future_tokens_do_not_change_past_logits(tiny_model):
    idx = torch.randint(0, 97, (1, 12))
    other = idx.clone()
    other[0, 8:] = (other[0, 8:] + 1) % 97
    assert torch.allclose(tiny_model(idx)[0, :8], tiny_model(other)[0, :8], atol=1e-5)


def test_hidden_states_are_what_the_head_reads(tiny_model):
    idx = torch.randint(0, 97, (2, 10))
    h = tiny_model.hidden_states(idx)
    assert h.shape == (2, 10, 64)
    # final RMSNorm without gain: every hidden vector has unit RMS
    assert torch.allclose(h.pow(2).mean(-1), torch.ones(2, 10), atol=1e-4)
    cap = tiny_model.config.softcap
    expected = cap * torch.tanh(F.linear(h, tiny_model.lm_head.weight) / cap)
    assert torch.allclose(tiny_model(idx), expected, atol=1e-5)


def test_softcap_bounds_logits(tiny_model):
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(100)
    logits = tiny_model(torch.randint(0, 97, (1, 5)))
    assert logits.abs().max() <= tiny_model.config.softcap + 1e-4


def test_param_count_and_flops():
    c = config_from_depth(4, 4096, 512, verbose=False)
    model = GPT(c)
    per_layer = 4 * 256 * 256 + 2 * 256 * 1024
    expected = 4 * per_layer + 2 * 4096 * 256
    assert model.num_params() == expected
    assert model.flops_per_token() == 6 * (expected - 4096 * 256) + 12 * 4 * 256 * 512


def test_gqa_model_runs_and_has_smaller_kv():
    model = make_tiny_model(n_kv_head=1)
    assert model.blocks[0].attn.c_k.weight.shape == (16, 64)
    assert model(torch.randint(0, 97, (2, 7))).shape == (2, 7, 97)


def test_orthogonalize_gives_near_orthogonal_rows():
    g = torch.randn(32, 64)
    o = orthogonalize(g, steps=10)
    s = torch.linalg.svdvals(o)
    # the quintic iteration trades exactness for speed: singular values land in roughly [0.7, 1.2]
    assert s.min() > 0.5 and s.max() < 1.3
    assert orthogonalize(torch.randn(64, 32)).shape == (64, 32)


@pytest.mark.parametrize("matrix_optimizer", ["muon", "adamw"])
def test_optimizers_reduce_loss(matrix_optimizer):
    torch.manual_seed(0)
    model = GPT(config_from_depth(2, 97, 32, n_embd=64, n_head=4, verbose=False))
    opts = model.setup_optimizers(matrix_optimizer=matrix_optimizer)
    idx = torch.randint(0, 97, (4, 16))
    first = model(idx[:, :-1], idx[:, 1:]).item()
    for _ in range(20):
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
    assert model(idx[:, :-1], idx[:, 1:]).item() < first - 1.0


def test_lr_schedule_shape():
    assert lr_multiplier(0, 100, 10, 0.2) == pytest.approx(0.1)
    assert lr_multiplier(50, 100, 10, 0.2) == 1.0
    assert lr_multiplier(90, 100, 10, 0.2) == pytest.approx(0.5)
    assert lr_multiplier(99, 100, 0, 0.2, final_frac=0.0) == pytest.approx(0.05)


def test_positions_past_the_rotary_table_are_refused_and_padding_keeps_them_in():
    # catches: the cheap slot-count test skipping the real check (a too-long sequence reading garbage rotary rows),
    # or refusing a cached batch whose left padding keeps every real position inside the table
    from nanochat.gpt import KVCache
    model = make_tiny_model()
    R = model.rotary_len
    with pytest.raises(ValueError, match="exceeds rotary length"):
        model(torch.zeros(1, R + 1, dtype=torch.long))
    model(torch.zeros(1, R, dtype=torch.long))  # exactly the table: fine
    cache = KVCache(model.config, 1, R + 1, "cpu")
    valid = torch.ones(1, R, dtype=torch.bool)
    valid[0, :2] = False  # two padding slots: the real tokens sit at positions 0 .. R - 3
    model(torch.zeros(1, R, dtype=torch.long), kv_cache=cache, valid=valid)
    model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)  # slot R, position R - 2: inside the table


def test_unpadded_cache_fast_path_equals_the_masked_path(tiny_model):
    # catches: the unpadded cache's no-mask attention running a single decode query causally against only the
    # first key (SDPA's is_causal aligns top-left), or its sliced rotary tables starting at the wrong slot
    from nanochat.gpt import KVCache
    idx = torch.randint(0, 97, (2, 7))
    steps = torch.randint(0, 97, (2, 4))
    outputs = {}
    for padded in (False, True):
        cache = KVCache(tiny_model.config, 2, 11, "cpu")
        cache.padded = padded  # True forces the general path: positions from `valid` and an explicit mask
        with torch.no_grad():
            logits = [tiny_model(idx, kv_cache=cache)]
            logits += [tiny_model(steps[:, t:t + 1], kv_cache=cache) for t in range(4)]
        outputs[padded] = torch.cat(logits, dim=1)
    assert torch.allclose(outputs[False], outputs[True], atol=1e-5)
    with torch.no_grad():
        full = tiny_model(torch.cat([idx, steps], dim=1))
    assert torch.allclose(outputs[False], full, atol=1e-5)


def test_hidden_states_at_one_position_per_row_equal_the_full_forward_and_its_gradients(tiny_model):
    # catches, in the last block's one-query path: keys after the query left unmasked (row 0 reads position 3 of
    # 9, the later tokens would leak in), the query rotated at the wrong position, a kv cache missing the last
    # layer's keys, or gradients that miss the keys/values of the other positions
    from nanochat.gpt import KVCache
    idx = torch.randint(0, 97, (3, 9))
    at = torch.tensor([3, 8, 0])
    rows = torch.arange(3)
    full = tiny_model.hidden_states(idx)
    assert torch.allclose(tiny_model.hidden_states(idx, at=at), full[rows, at], atol=1e-5)
    last = torch.full((3,), 8)
    assert torch.allclose(tiny_model.hidden_states(idx, at=last), full[:, -1], atol=1e-5)
    grads = []
    for h in (lambda: tiny_model.hidden_states(idx)[rows, at], lambda: tiny_model.hidden_states(idx, at=at)):
        tiny_model.zero_grad()
        h().pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None]))
    assert grads[0].shape == grads[1].shape and torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-4)
    # a left-padded prefill: the last column's state, and a cache from which decoding goes on as from the full one
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[0, :2], valid[2, :5] = False, False
    caches = [KVCache(tiny_model.config, 3, 12, "cpu") for _ in range(2)]
    with torch.no_grad():
        last = [tiny_model.hidden_states(idx, caches[0], valid)[:, -1],
                tiny_model.hidden_states(idx, caches[1], valid, at=last)]
        assert torch.allclose(last[0], last[1], atol=1e-5)
        step = torch.randint(0, 97, (3, 1))
        assert torch.allclose(tiny_model(step, kv_cache=caches[0]), tiny_model(step, kv_cache=caches[1]), atol=1e-5)


def test_a_rows_single_query_outputs_do_not_depend_on_the_other_rows_to_the_bit():
    # catches: a single query's attention through SDPA, whose CPU kernel splits the keys among threads by batch
    # size: the last bits of a row then change with its batch, and two ranks no longer sample what one does
    from nanochat.gpt import KVCache
    model = make_tiny_model(vocab_size=300)
    idx = torch.randint(0, 300, (8, 20))
    valid = torch.ones(8, 20, dtype=torch.bool)
    valid[1, :5], valid[5, :3] = False, False
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # one thread runs every kernel the same way whatever the batch
    try:
        outputs = []
        with torch.no_grad():
            for rows in (slice(0, 8), slice(0, 4)):
                cache = KVCache(model.config, rows.stop, 24, "cpu")
                prefill = model.hidden_states(idx[rows], cache, valid[rows], at=torch.full((rows.stop,), 19))
                outputs.append((prefill[:4], model(idx[rows, :1], kv_cache=cache)[:4]))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*outputs))


def count_applies(monkeypatch, function):
    """
    A list that each call of an autograd Function's apply adds to: a fused path must really run, or its test compares
    the plain path with itself.
    """
    calls, apply = [], function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@pytest.mark.parametrize("softcap", [15.0, 0.0])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fused_training_loss_equals_plain_cross_entropy(monkeypatch, softcap, reduction):
    # catches: the fused loss dropping the softcap's 1 - tanh^2 in its gradient, letting ignored targets count, or
    # losing rows at a chunk boundary (3 x 9 rows in chunks of 4 leave a partial last chunk)
    from nanochat import gpt
    monkeypatch.setattr(gpt, "LOSS_CHUNK", 4)
    calls = count_applies(monkeypatch, gpt.HeadCrossEntropy)
    model = make_tiny_model()
    model.config.softcap = softcap
    idx = torch.randint(0, 97, (3, 9))
    targets = torch.randint(0, 97, (3, 9))
    targets[0, :5] = -1
    fused = model(idx, targets, loss_reduction=reduction)
    assert calls == [1]
    fused.backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model.logits_from_hidden(model.hidden_states(idx))  # the unfused path
    plain = F.cross_entropy(logits.view(-1, 97), targets.view(-1), ignore_index=-1, reduction=reduction)
    plain.backward()
    assert torch.allclose(fused, plain, rtol=1e-5)
    for p, g in zip(model.parameters(), fused_grads):  # float32 sums in another order: relative to the largest
        assert (g - p.grad).abs().max() <= 1e-5 * p.grad.abs().max()


@pytest.mark.parametrize("softcap,temperature", [(15.0, 1.0), (15.0, 0.7), (0.0, 1.3)])
def test_fused_token_logprobs_equal_plain_log_softmax(monkeypatch, softcap, temperature):
    # catches: HeadLogprobs dropping the softcap's 1 - tanh^2 or the temperature from its gradient, scaling each
    # row's gradient by another row's incoming gradient (or by their sum), a wrong sign, an entropy of the wrong
    # distribution, and rows lost or shifted at a chunk boundary (3 x 9 rows in chunks of 4)
    from nanochat import gpt
    monkeypatch.setattr(gpt, "LOSS_CHUNK", 4)
    calls = count_applies(monkeypatch, gpt.HeadLogprobs)
    model = make_tiny_model()
    model.config.softcap = softcap
    idx, tokens = torch.randint(0, 97, (3, 9)), torch.randint(0, 97, (3, 9))
    upstream = torch.randn(3, 9)  # a different gradient at every position, as GRPO's per-token losses give
    chosen, entropy = model.token_logprobs(model.hidden_states(idx), tokens, temperature, with_entropy=True)
    assert calls == [1] and not entropy.requires_grad
    (chosen * upstream).sum().backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logp = F.log_softmax(model.logits_from_hidden(model.hidden_states(idx)) / temperature, dim=-1)  # unfused
    plain = logp.gather(-1, tokens[..., None]).squeeze(-1)
    (plain * upstream).sum().backward()
    assert torch.allclose(chosen, plain, atol=1e-5)
    assert torch.allclose(entropy, -(logp.exp() * logp).sum(-1).detach(), atol=1e-5)
    for p, g in zip(model.parameters(), fused_grads):  # float32 sums in another order: relative to the largest
        assert (g - p.grad).abs().max() <= 1e-5 * p.grad.abs().max()
    with torch.no_grad():  # a frozen reference's log-probs: the policy's bits, so DPO's first loss is ln 2 exactly
        assert torch.equal(model.token_logprobs(model.hidden_states(idx), tokens, temperature), chosen.detach())


def test_decode_step_equals_the_modules_to_the_bit_whatever_the_batch():
    # catches: decode_step's plain-op copy of a block drifting from the modules (keys or values cut from the wrong
    # columns of the stacked q/k/v product under GQA, a padded row's mask dropped), a column-major matmul result
    # whose norms then sum in another order, and decode_linear running 2-11 rows unpadded (MKL's kernels for them
    # give other bits than for 12+ rows, so a row's numbers would change as the engine drops rows)
    from nanochat.gpt import KVCache
    model = make_tiny_model(vocab_size=300)  # GQA: 4 query heads, 2 key/value heads
    idx = torch.randint(0, 300, (16, 12))
    valid = torch.ones(16, 12, dtype=torch.bool)
    valid[1, :5], valid[6, :3] = False, False  # left padding: per-row rotary positions and a key mask
    step = torch.randint(0, 300, (16,))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # MKL gives F.linear's rows the same bits from 4 rows on only in one thread
    try:
        with torch.inference_mode():
            outputs = {}
            for rows, packed in ((16, False), (16, True), (12, True), (7, True), (4, True), (2, True), (1, False),
                                 (1, True)):
                cache = KVCache(model.config, rows, 14, "cpu")
                model.hidden_states(idx[:rows], cache, valid[:rows])
                first = model.decode_step(step[:rows], cache, model.decode_weights(rows) if packed else None)
                second = model.decode_step(first[1].argmax(-1), cache, model.decode_weights(rows) if packed else None)
                outputs[rows, packed] = [*first, *second, cache.k, cache.v]
    finally:
        torch.set_num_threads(threads)
    for (rows, packed), tensors in outputs.items():
        # a single row is its own case: F.linear's one-row kernel gives other bits than its 4+ rows one, and
        # decode_step multiplies one row by the transposed matrices, in other bits again
        reference = outputs[16, False] if rows > 1 else outputs[1, False]
        for got, expected in zip(tensors, reference):
            expected = expected[:rows] if got.dim() < 5 else expected[:, :rows]
            assert torch.equal(got, expected) if rows > 1 else torch.allclose(got, expected, atol=1e-5), (rows, packed)
