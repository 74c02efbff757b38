import itertools
import math
import random

import pytest
import torch

from conftest import make_tiny_model
from nanochat import grpo
from nanochat.engine import Engine
from nanochat.grpo import (GRPOConfig, batch_logprobs, completion_logprobs, completion_states, group_advantages,
                           group_rewards, grpo_step, grpo_token_losses, length_chunks, micro_batches, pack_groups,
                           policy_update, reduce_tokens)
from nanochat.rm import RewardModel, rewards_for_ids


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    adv = group_advantages(rewards, "group", eps=0.0 + 1e-4)
    # group 1: mean 2, unbiased std 1; group 2: all equal -> no signal at all
    assert torch.allclose(adv[0], torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-4))
    assert torch.equal(adv[1], torch.zeros(3))
    assert torch.equal(group_advantages(rewards, "none"), torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))


def test_clipped_loss_and_k3_kl_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.1]]))
    old = torch.log(torch.tensor([[0.25, 0.25, 0.1]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.2]]))
    loss, pg, kl, clipped = grpo_token_losses(logp, old, ref, torch.tensor([1.0]), clip_eps=0.2, beta=0.5)
    # ratios 2, 2, 1: with A = 1 the first two are clipped to 1.2
    assert torch.allclose(pg, torch.tensor([[-1.2, -1.2, -1.0]]))
    assert clipped.tolist() == [[1.0, 1.0, 0.0]]
    # k3: exp(ref - logp) - (ref - logp) - 1
    expected_kl = torch.tensor([[0.5 - math.log(0.5) - 1, 0.0, 2.0 - math.log(2.0) - 1]])
    assert torch.allclose(kl, expected_kl, atol=1e-6)
    assert torch.allclose(loss, pg + 0.5 * expected_kl, atol=1e-6)
    # with a negative advantage the pessimistic term is the unclipped one: -min(-2, -1.2) = 2
    _, pg_neg, _, clipped_neg = grpo_token_losses(logp, old, ref, torch.tensor([-1.0]), clip_eps=0.2)
    assert torch.allclose(pg_neg, torch.tensor([[2.0, 2.0, 1.0]]))
    assert clipped_neg.sum() == 0


def test_kl_is_zero_when_policy_equals_reference():
    logp = torch.randn(3, 5).log_softmax(-1)
    _, _, kl, _ = grpo_token_losses(logp, logp, logp.clone(), torch.randn(3), beta=1.0)
    assert torch.equal(kl, torch.zeros(3, 5))


def test_token_and_sequence_reductions_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert reduce_tokens(values, mask, "token", 4).item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert reduce_tokens(values, mask, "sequence", 2).item() == pytest.approx((2.0 + 4.0) / 2)


def full_forward_logprobs(model, prompts, completions, temperature=1.0):
    """The independent reference: each prompt + completion row alone through model(), its completion log-probs."""
    G = len(completions) // len(prompts)
    width = max(len(c) for c in completions)
    rows = []
    for i, c in enumerate(completions):
        p = prompts[i // G]
        logp = (model(torch.tensor([p + c]))[0] / temperature).log_softmax(-1)
        row = torch.stack([logp[len(p) - 1 + t, c[t]] for t in range(len(c))])
        rows.append(torch.cat([row, row.new_zeros(width - len(c))]))
    return torch.stack(rows)


# prompts of different lengths (left padding), completions of different lengths (right padding), G = 2
PROMPTS = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
COMPLETIONS = [[10, 11], [12, 13, 14, 15], [16], [17, 18, 19], [20, 21, 22, 23], [24]]


# overhead 0: a chunk per length, so rows of one group land in different chunks and are put back in place; the
# default: one chunk of every row at these lengths
@pytest.mark.parametrize("overhead", [0, grpo.CHUNK_OVERHEAD])
def test_shared_prompt_logprobs_and_gradients_equal_full_forwards_of_every_row(overhead, monkeypatch):
    monkeypatch.setattr(grpo, "CHUNK_OVERHEAD", overhead)
    batch = pack_groups(PROMPTS, COMPLETIONS, pad_id=0)
    mask = batch.completion_mask
    assert mask.sum(1).tolist() == [len(c) for c in COMPLETIONS]
    model = make_tiny_model()
    got = completion_logprobs(model, batch)
    (got * mask).sum().backward()
    reference = make_tiny_model()
    expected = full_forward_logprobs(reference, PROMPTS, COMPLETIONS)
    assert torch.allclose(got * mask, expected, atol=1e-5)
    expected.sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    # micro-batches of whole groups give the same numbers
    assert torch.allclose(batch_logprobs(model, batch, rows_per_batch=2) * mask, expected, atol=1e-5)


@pytest.mark.parametrize("overhead", [0, grpo.CHUNK_OVERHEAD])
def test_group_rewards_equal_rewards_of_every_full_row(overhead, monkeypatch):
    monkeypatch.setattr(grpo, "CHUNK_OVERHEAD", overhead)
    rm = RewardModel(make_tiny_model(seed=1))
    with torch.no_grad():
        rm.head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
    batch = pack_groups(PROMPTS, COMPLETIONS, pad_id=0)
    rows = [PROMPTS[i // 2] + c for i, c in enumerate(COMPLETIONS)]
    expected = rewards_for_ids(rm, rows)
    assert expected.std() > 0.1  # distinct rewards, so a mix-up of rows would show
    assert torch.allclose(group_rewards(rm, batch, rows_per_batch=2), expected, atol=1e-5)
    with pytest.raises(ValueError, match="at least one token"):
        group_rewards(rm, pack_groups(PROMPTS[:1], [[1], []], pad_id=0), rows_per_batch=2)


def test_completion_chunks_run_only_to_their_own_longest_row():
    # catches: chunks padded to the batch's longest completion (the skewed lengths GRPO samples would make most of
    # the work padding), rows taken in batch order instead of by length, and masked-out rows still being run.
    # Lengths 1, (12, masked out), 100, 2: one chunk would run 3 x 100 tokens, the long row alone 100 + 2 x 2
    prompts = [[1, 2], [3, 4, 5]]
    completions = [[6], list(range(10, 22)), [7] * 100, [9, 9]]
    batch = pack_groups(prompts, completions, pad_id=0)
    batch = batch._replace(completion_mask=batch.completion_mask & (torch.arange(4) != 1)[:, None])
    chunks = [(rows.tolist(), hidden.size(1)) for rows, hidden in completion_states(make_tiny_model(), batch, True)]
    assert chunks == [([2], 100), ([3, 0], 2)]


def test_length_chunks_by_hand_and_against_every_partition():
    # by hand: equal lengths share a chunk whatever the overhead; 100, 2, 1 at overhead 64 costs 100 + 64 + 2 * 2
    # + 64 split after the long row, 3 * 100 + 64 whole, 2 * 100 + 64 + 1 + 64 split before the last
    assert length_chunks([5, 5, 5, 5], 64) == [4]
    assert length_chunks([100, 2, 1], 64) == [1, 2]
    assert length_chunks([3, 3, 2, 1], 0) == [2, 1, 1]
    assert length_chunks([], 64) == []

    # catches: a chunk costed at its shortest row, a greedy cut, sizes returned last chunk first
    def cost(lengths, sizes, overhead):
        starts = [0, *itertools.accumulate(sizes)][:-1]
        return sum(n * lengths[i] + overhead for i, n in zip(starts, sizes))

    rng = random.Random(0)
    for _ in range(200):
        lengths = sorted((rng.choice([1, 2, 3, 5, 8, 20, 64]) for _ in range(rng.randint(1, 8))), reverse=True)
        overhead = rng.choice([0, 3, 10, 64])
        sizes = length_chunks(lengths, overhead)
        assert sum(sizes) == len(lengths) and min(sizes) >= 1
        every = [[b - a for a, b in zip((0, *cuts), (*cuts, len(lengths)))]
                 for k in range(len(lengths)) for cuts in itertools.combinations(range(1, len(lengths)), k)]
        assert cost(lengths, sizes, overhead) == min(cost(lengths, p, overhead) for p in every)


def test_pack_groups_rejects_completions_that_do_not_form_groups():
    with pytest.raises(ValueError, match="groups"):
        pack_groups(PROMPTS, COMPLETIONS[:5], pad_id=0)


def test_one_pass_ratio_is_one_so_the_update_is_the_plain_policy_gradient():
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.0, 0.5, -2.0])
    batch = pack_groups(PROMPTS, COMPLETIONS, pad_id=0)
    config = GRPOConfig(num_iterations=1, device_batch_size=4, loss_type="token", clip_eps=0.2, beta=0.0,
                        grad_clip=0.0)
    n_tokens = int(batch.completion_mask.sum())

    model = make_tiny_model()
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = batch_logprobs(model, batch, 4)
    stats = policy_update(model, [sgd], batch, ref, advantages, config, num_sequences_global=6,
                          num_tokens_global=n_tokens)
    assert stats["clip_ratio"] == 0.0 and stats["kl"] == 0.0

    # the plain policy gradient, from full forwards of every row: d/dtheta of -sum_t A * log pi(y_t) / N
    plain = make_tiny_model()
    logp = full_forward_logprobs(plain, PROMPTS, COMPLETIONS)
    (-(advantages[:, None] * logp * batch.completion_mask).sum() / n_tokens).backward()
    for name, p in plain.named_parameters():
        step = before[name] - model.state_dict()[name]
        assert torch.allclose(step, p.grad, atol=1e-6), name


def test_micro_batches_cut_padding_but_the_update_equals_one_full_width_pass():
    # catches: an off-by-one cut that drops each micro-batch's last real token, a cut by row instead of column,
    # and a masked-out long completion (truncated) that still makes every row of its micro-batch run full width
    prompts = [[1, 5, 9], [1, 7], [1, 4, 4, 6]]
    completions = [[3, 8], [2], [6, 6, 2], [5], list(range(10, 22)), [9, 3]]  # row 4 ran into the limit
    batch = pack_groups(prompts, completions, pad_id=0)
    batch = batch._replace(completion_mask=batch.completion_mask & (torch.arange(6) != 4)[:, None])
    assert [sub.completion_ids.size(1) for _, sub in micro_batches(batch, 2)] == [2, 3, 2]
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.0, 0.5, -2.0])
    config = GRPOConfig(device_batch_size=2, beta=0.1, grad_clip=0.0)
    n_tokens = int(batch.completion_mask.sum())
    model, reference = make_tiny_model(), make_tiny_model(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = batch_logprobs(reference, batch, 2)
    policy_update(model, [torch.optim.SGD(model.parameters(), lr=1.0)], batch, ref, advantages, config, 6, n_tokens)

    # reference computation: one full-width pass over every row, no micro-batches
    plain = make_tiny_model()
    logp = completion_logprobs(plain, batch)
    with torch.no_grad():
        ref_full = completion_logprobs(reference, batch)
    loss, *_ = grpo_token_losses(logp, logp.detach(), ref_full, advantages, 0.2, 0.1)
    reduce_tokens(loss, batch.completion_mask, "token", n_tokens).backward()
    for name, p in plain.named_parameters():  # float32 rounding of log-probs near -9 is ~1e-6: a small relative slack
        assert torch.allclose(before[name] - model.state_dict()[name], p.grad, atol=1e-5, rtol=1e-5), name


def test_upper_clip_epsilon_high_by_hand():
    # catches: epsilon_high ignored (DAPO's clip-higher silently equal to the symmetric clip), or applied below
    logp = torch.log(torch.tensor([[0.5, 0.1]]))
    old = torch.log(torch.tensor([[0.25, 0.2]]))  # ratios 2 and 0.5
    ref = logp.clone()
    _, pg, _, clipped = grpo_token_losses(logp, old, ref, torch.tensor([1.0]), clip_eps=0.2, epsilon_high=0.28)
    assert torch.allclose(pg, torch.tensor([[-1.28, -0.5]]))  # 2 clipped to 1 + 0.28; 0.5 below: min keeps 0.5
    _, pg_neg, _, _ = grpo_token_losses(logp, old, ref, torch.tensor([-1.0]), clip_eps=0.2, epsilon_high=0.28)
    assert torch.allclose(pg_neg, torch.tensor([[2.0, 0.8]]))  # -min(-2, -1.28) = 2; -min(-0.5, -0.8) = 0.8
    assert clipped.tolist() == [[1.0, 0.0]]


def test_logprobs_at_a_temperature_are_those_of_the_tempered_distribution():
    # catches: the loss scoring temperature-1 log-probs of completions sampled at T (the KL then estimates neither
    # KL(pi_T || ref_T) nor KL(pi || ref))
    batch = pack_groups(PROMPTS, COMPLETIONS, pad_id=0)
    model = make_tiny_model()
    expected = full_forward_logprobs(model, PROMPTS, COMPLETIONS, temperature=0.5)
    got = completion_logprobs(model, batch, temperature=0.5)
    assert torch.allclose(got * batch.completion_mask, expected, atol=1e-5)
    assert not torch.allclose(completion_logprobs(model, batch) * batch.completion_mask, expected, atol=1e-2)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own compiler internals (torch.jit)
def test_compiled_tail_gives_the_eager_log_probs_entropies_and_gradients():
    # catches: --compile's wrapper dropping or misplacing an argument (a temperature-1 tail gave other log-probs
    # here), and a compiled plain tail whose gradients differ from the hand-fused one's
    batch = pack_groups(PROMPTS, COMPLETIONS, pad_id=0)
    model = make_tiny_model()
    outputs = []
    for compile in (False, True):
        model.zero_grad()
        logp, entropy = completion_logprobs(model, batch, temperature=0.7, with_entropy=True, compile=compile)
        (logp * torch.arange(logp.numel()).view_as(logp)).sum().backward()
        outputs.append((logp.detach(), entropy, [p.grad.clone() for p in model.parameters()]))
    (eager, eager_entropy, eager_grads), (compiled, compiled_entropy, compiled_grads) = outputs
    assert torch.allclose(compiled, eager, atol=1e-5) and torch.allclose(compiled_entropy, eager_entropy, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_later_passes_take_the_ratio_against_the_sampling_policy():
    # catches: num_iterations > 1 using the current policy as pi_old (the ratio is then always 1 and never clipped)
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.0, 0.5, -2.0])
    batch = pack_groups(PROMPTS, COMPLETIONS, pad_id=0)
    model = make_tiny_model()
    ref = batch_logprobs(model, batch, 4)
    config = GRPOConfig(num_iterations=3, device_batch_size=4, beta=0.0, grad_clip=0.0)
    stats = policy_update(model, [torch.optim.SGD(model.parameters(), lr=3.0)], batch, ref, advantages, config,
                          num_sequences_global=6, num_tokens_global=int(batch.completion_mask.sum()))
    # pass 1 is unclipped by construction; passes 2 and 3 see ratios far from 1 after a large step
    assert stats["clip_ratio"] > 0.05
    one = make_tiny_model()
    stats_one = policy_update(one, [torch.optim.SGD(one.parameters(), lr=3.0)], batch, ref, advantages,
                              GRPOConfig(num_iterations=1, device_batch_size=4, beta=0.0, grad_clip=0.0),
                              num_sequences_global=6, num_tokens_global=int(batch.completion_mask.sum()))
    assert stats_one["clip_ratio"] == 0.0


def count_low_ids(batch):
    """A toy reward: how many completion tokens have an id below 48 (about half of them at random init)."""
    return ((batch.completion_ids < 48) & batch.completion_mask).sum(1).float()


def test_grpo_step_with_a_toy_reward_learns_it():
    # catches: a sign error in advantages or loss, rewards misaligned with their rows, groups mixed up
    torch.manual_seed(0)
    policy, reference = make_tiny_model(seed=3), make_tiny_model(seed=3)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    # no stop token here, so every completion is cut at max_new_tokens: keep them in the loss
    config = GRPOConfig(num_generations=8, max_new_tokens=6, beta=0.0, device_batch_size=32,
                        mask_truncated_completions=False)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    engine = Engine(policy)
    means = [grpo_step(policy, reference, [optimizer], engine, prompts, count_low_ids, config, [], seed=step)[0]
             ["reward"] for step in range(30)]
    assert sum(means[-5:]) / 5 > sum(means[:5]) / 5 + 1.0, means  # of at most 6


def test_truncated_completions_are_scored_but_enter_no_loss():
    # catches: the update learning from completions cut by max_new_tokens (read by a reward model at a token it
    # never saw), or the mask dropping the rewards too
    prompts = [[1, 2, 3], [4, 5]]
    config = GRPOConfig(num_generations=4, max_new_tokens=3, beta=0.0, device_batch_size=8)
    for mask_truncated, moves in ((True, False), (False, True)):
        policy = make_tiny_model(seed=4)
        before = {k: v.clone() for k, v in policy.state_dict().items()}
        config.mask_truncated_completions = mask_truncated
        stats, batch, rewards = grpo_step(policy, make_tiny_model(seed=4), [torch.optim.SGD(policy.parameters(),
                                          lr=1.0)], Engine(policy), prompts, count_low_ids, config, [], seed=0)
        assert stats["truncated"] == 1.0  # no stop tokens: every completion runs into the limit
        assert torch.equal(rewards, count_low_ids(batch)) and rewards.std() > 0
        changed = any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
        assert changed == moves


# -----------------------------------------------------------------------------
# the stage as a user runs it, at tiny size

@pytest.fixture(scope="module")
def grpo_stage(tmp_path_factory):
    """A tiny SFT checkpoint, a tiny reward model and synthetic pairs files, all written here."""
    import json

    from nanochat.checkpoint import save_checkpoint
    from nanochat.rm import RewardModel
    from nanochat.synthetic import make_world
    from nanochat.tokenizer import train_tokenizer
    from scripts import kat_density, kat_make_prompts

    root = tmp_path_factory.mktemp("grpo")
    world = make_world(seed=0)
    tok = train_tokenizer(world.pretrain_documents(300, seed=0), 300)
    tok.save(root / "tokenizer")
    sft = make_tiny_model(vocab_size=300, sequence_len=128)
    save_checkpoint(root / "sft", sft, 0, str(root / "tokenizer"), world={"seed": 0, "size": 1})
    rm = RewardModel(make_tiny_model(seed=1, vocab_size=300, sequence_len=128))
    with torch.no_grad():
        rm.head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    save_checkpoint(root / "rm", rm, 0, str(root / "tokenizer"), kind="rm")
    pairs = world.preference_pairs(40, seed=0)
    for name, rows in (("pairs_all.jsonl", pairs[:30]), ("pairs_test.jsonl", pairs[30:])):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the density weights as the pipeline makes them: prompts, then kat_density on the SFT model
    kat_make_prompts.main([f"--pairs_path={root / 'pairs_all.jsonl'}", f"--out_dir={root}",
                           f"--report_dir={root / 'outs' / 'prompts'}"])
    kat_density.main([f"--prompts_path={root / 'prompts_all.jsonl'}", f"--pairs_path={root / 'pairs_all.jsonl'}",
                      f"--sft_ckpt_path={root / 'sft'}", "--density_k=3", f"--cache_dir={root}",
                      f"--density_path={root / 'density.jsonl'}", f"--test_pairs_path={root / 'pairs_test.jsonl'}",
                      f"--test_density_path={root / 'density_test.jsonl'}",
                      f"--report_dir={root / 'outs' / 'density'}", "--device=cpu"])
    return root


def grpo_flags(root, **overrides):
    flags = {"sft_ckpt_path": root / "sft", "rm_ckpt_path": root / "rm", "pairs_path": root / "pairs_all.jsonl",
             "test_pairs_path": root / "pairs_test.jsonl", "density_path": root / "density.jsonl",
             "prompts_per_step": 2, "num_generations": 3, "max_new_tokens": 6, "max_steps": 4, "save_every": 2,
             "eval_every": 2, "eval_prompts": 4, "device_batch_size": 4, "learning_rate": 1e-3}
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items()]


def test_grpo_script_trains_reports_and_resumes_exactly(grpo_stage, capsys, monkeypatch):
    import json

    from scripts import kat_train_grpo

    kat_train_grpo.main(grpo_flags(grpo_stage, out_dir=grpo_stage / "straight"))
    log = capsys.readouterr().out
    assert "step     4/4 | Loss:" in log and "PG Loss:" in log and "KL Loss:" in log and "density-aware" in log
    meta = json.load(open(grpo_stage / "straight" / "meta.json"))
    assert meta["metrics"]["steps"] == 4 and "gold_score_final" in meta["metrics"]
    assert (grpo_stage / "straight" / "report.md").exists()
    # drawn_prompts.json counts every draw of the 4 steps x 2 prompts by training quartile and cluster
    drawn = json.load(open(grpo_stage / "straight" / "drawn_prompts.json"))
    quartile_of = {r["prompt_id"]: r["quartile"] for r in map(json.loads, open(grpo_stage / "density.jsonl"))}
    cluster_of = {r["prompt_id"]: r["cluster"] for r in map(json.loads, open(grpo_stage / "pairs_all.jsonl"))}
    assert drawn["draws"] == 8 and sum(drawn["by_quartile"].values()) == 8 and sum(drawn["by_cluster"].values()) == 8
    assert set(drawn["by_quartile"]) == {"q1", "q2", "q3", "q4"}
    assert set(drawn["by_cluster"]) <= set(cluster_of.values())
    assert set(quartile_of) == set(cluster_of)

    # a uniform run killed during step 3 (after the step-2 checkpoint), then resumed, ends with the weights
    # of the uninterrupted run
    uniform = ["--density_aware=False"]
    kat_train_grpo.main(grpo_flags(grpo_stage, out_dir=grpo_stage / "uniform") + uniform)
    expected = torch.load(grpo_stage / "uniform" / "ckpt.pt", weights_only=True)["model"]
    calls = []

    def killed_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return grpo_step(*args, **kwargs)

    monkeypatch.setattr(kat_train_grpo, "grpo_step", killed_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        kat_train_grpo.main(grpo_flags(grpo_stage, out_dir=grpo_stage / "killed") + uniform)
    monkeypatch.undo()
    kat_train_grpo.main(grpo_flags(grpo_stage, out_dir=grpo_stage / "killed") + uniform + ["--resume=true"])
    resumed = torch.load(grpo_stage / "killed" / "ckpt.pt", weights_only=True)["model"]
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
    # the resumed run counts the draws of the steps before its restart too
    assert json.load(open(grpo_stage / "killed" / "drawn_prompts.json")) == \
        json.load(open(grpo_stage / "uniform" / "drawn_prompts.json"))


def test_grpo_evaluation_in_chunks_samples_what_one_call_does(grpo_stage, monkeypatch):
    # catches: a chunk of held-out prompts drawing the random numbers of the first rows (its global row offset
    # without the chunk's start), or chunks that lose or repeat prompts
    import json

    from scripts import kat_train_grpo

    flags = {"max_steps": 1, "eval_every": 0, "save_every": 0}
    kat_train_grpo.main(grpo_flags(grpo_stage, out_dir=grpo_stage / "eval_whole", **flags))
    monkeypatch.setattr(kat_train_grpo, "EVAL_CHUNK", 1)
    kat_train_grpo.main(grpo_flags(grpo_stage, out_dir=grpo_stage / "eval_chunks", **flags))
    whole, chunks = (json.load(open(grpo_stage / run / "meta.json"))["metrics"]
                     for run in ("eval_whole", "eval_chunks"))
    keys = [f"{k}_{when}" for k in ("reward", "gold_score", "gold_correct") for when in ("start", "final")]
    assert {k: chunks[k] for k in keys} == {k: whole[k] for k in keys}


def test_grpo_refuses_density_weights_built_from_another_model(grpo_stage, tmp_path):
    # catches: density weights of another SFT model (or a recomputation with other flags) silently used: the one
    # source of weights is kat_density's file for exactly this --sft_ckpt_path
    from nanochat.checkpoint import save_checkpoint
    from nanochat.common import InputError
    from scripts import kat_train_grpo

    save_checkpoint(tmp_path / "other_sft", make_tiny_model(seed=9, vocab_size=300, sequence_len=128), 0,
                    str(grpo_stage / "tokenizer"), world={"seed": 0, "size": 1})
    with pytest.raises(InputError, match="density.jsonl was built from the embeddings of .*sft.*whose weights differ"):
        kat_train_grpo.main(grpo_flags(grpo_stage, out_dir=tmp_path / "run", sft_ckpt_path=tmp_path / "other_sft"))
