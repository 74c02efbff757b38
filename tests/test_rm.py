"""
The reward model against independent expectations: a reward read alone equals the reward read in a right-padded
batch (at the final reply's end token of a multi-turn chat), hand-computed Bradley-Terry losses, identical replies
that cannot be told apart however long it trains, swapped pairs with every margin's sign flipped, accuracy split by
reply length exposing a reward that prefers short replies, two torchrun processes that train like one, and a
reward model trained on its top blocks only (`--train_layers`) that gets the whole model's gradients there and
leaves the rest as the SFT model had it.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import LN2, ROOT, Interrupted, kill_after_checkpoint, make_tiny_model, render_pairs
from nanochat.batching import collate_right
from nanochat.checkpoint import CheckpointError, save_checkpoint
from nanochat.common import InputError
from nanochat.density import read_densities
from nanochat.preference import micro_batches, pack_pairs, pair_batch, render_reply, sampling_weights, split_pair
from nanochat.rm import (RewardModel, bt_losses, flat_metrics, freeze_lower_blocks, load_reward_model, metrics_table,
                         pair_margins, pair_rewards, preference_metrics, rewards_for_ids, rm_train_step,
                         setup_rm_optimizers)
from scripts import kat_eval_rm, kat_train_rm


@pytest.fixture(scope="module")
def rows(world):
    return world.preference_pairs(24, seed=0)


def random_rm(seed=0):
    rm = RewardModel(make_tiny_model(seed=seed, vocab_size=300, sequence_len=64))
    with torch.no_grad():
        rm.head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    return rm


def swapped(rows):
    return [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# -----------------------------------------------------------------------------
# the reward

def test_reward_in_a_right_padded_batch_equals_the_row_alone(tok, rows):
    rm = random_rm().eval()
    id_lists = [ids for ids, _ in render_pairs(tok, rows[:6])]
    assert len({len(ids) for ids in id_lists}) > 2, "rows of different lengths are the point"
    with torch.no_grad():
        # independent expectation: the whole row alone, the head applied to its final position
        alone = torch.stack([rm.head(rm.backbone.hidden_states(torch.tensor([ids]))[0, -1])[0] for ids in id_lists])
        idx, last = collate_right(id_lists, pad_id=7)
        batched = rm(idx, last)
        other_pad = rm(*collate_right(id_lists, pad_id=123))
    assert alone.abs().min() > 1e-3, "zero rewards would hide a wrong index"
    assert torch.allclose(batched, alone, atol=1e-5, rtol=1e-5)
    assert torch.allclose(other_pad, batched, atol=1e-6, rtol=1e-6)
    assert torch.allclose(rewards_for_ids(rm, id_lists, batch_size=4), alone, atol=1e-5, rtol=1e-5)


def test_the_reward_of_a_multi_turn_chat_is_read_at_its_final_end_token(tok):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where does Zavu live?"},
                {"role": "assistant", "content": "In Korlin."}, {"role": "user", "content": "How old is Zavu?"}]
    rm = random_rm().eval()
    ids, _ = render_reply(tok, messages, "Zavu is 41.")
    full, _ = tok.render_conversation(messages + [{"role": "assistant", "content": "Zavu is 41."}], max_tokens=None)
    end = tok.encode_special("<|assistant_end|>")
    assert ids == full and ids.count(end) == 2 and ids[-1] == end
    idx, last = collate_right([ids, ids[:5]])
    assert last[0] == len(full) - 1
    with torch.no_grad():
        expected = rm.head(rm.backbone.hidden_states(torch.tensor([full]))[0, len(full) - 1])[0]
        assert rm(idx, last)[0] == pytest.approx(expected.item(), abs=1e-5)


def test_a_pair_batch_scores_each_reply_as_its_whole_render_alone_with_the_same_gradients(tok, rows):
    # catches, in the shared-prompt pair batch: a reply continuing another pair's prompt, chosen and rejected read
    # the wrong way round, rewards left in the chunk's length order instead of row order, the reward read one token
    # before the end (or on a pad), or a prompt pass whose gradients are lost
    rm = random_rm(seed=2).train()
    batch = rows[:5]
    ends = [ids for ids, _ in render_pairs(tok, batch)]  # chosen renders 0-4, then rejected 0-4
    assert len({len(ids) for ids in ends}) > 3, "replies of different lengths are the point"

    def alone():  # independent expectation: each whole render through the plain model, its last position read
        rewards = torch.stack([rm.head(rm.backbone.hidden_states(torch.tensor([ids]))[0, -1])[0] for ids in ends])
        return rewards.view(2, -1).T  # (pairs, [chosen, rejected])

    def grads(rewards):
        rm.zero_grad()
        (rewards * torch.tensor([1.0, -0.5])).sum().backward()
        return torch.cat([p.grad.flatten() for p in rm.parameters() if p.grad is not None])

    expected = alone()
    got = pair_rewards(rm, pack_pairs([split_pair(tok, r) for r in batch]))
    assert expected.abs().min() > 1e-3, "zero rewards would hide a wrong index"
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(grads(got), grads(alone()), atol=1e-5, rtol=1e-4)


def test_train_layers_trains_the_top_blocks_and_head_on_the_full_models_gradients(tok, rows):
    # catches: the bottom blocks trained instead of the top ones, the embedding left trainable or in an optimizer,
    # and a freeze that changes what still trains (a detach at the wrong block: the trained part must get exactly
    # the gradient the whole model gives it)
    full, part = random_rm(seed=3).train(), random_rm(seed=3).train()
    top = {f"backbone.blocks.1.{name}" for name, _ in part.backbone.blocks[1].named_parameters()} | {"head.weight"}
    trained = freeze_lower_blocks(part, 1)
    assert trained == sum(p.numel() for name, p in part.named_parameters() if name in top)
    batch = pack_pairs([split_pair(tok, r) for r in rows[:4]])
    for rm in (full, part):
        rewards = pair_rewards(rm, batch)
        bt_losses(rewards[:, 0], rewards[:, 1]).sum().backward()
    grads = {name: p.grad for name, p in part.named_parameters() if p.grad is not None}
    assert set(grads) == top
    whole = dict(full.named_parameters())
    for name, grad in grads.items():
        assert grad.abs().max() > 0 and torch.allclose(grad, whole[name].grad, atol=1e-6, rtol=1e-5), name
    before = {name: p.detach().clone() for name, p in part.named_parameters()}
    rm_train_step(part, setup_rm_optimizers(part, 0.02, 1e-2, 1e-2), micro_batches(tok, rows[:4], 2), 4)
    for name, p in part.named_parameters():
        assert torch.equal(p, before[name]) == (name not in top), name
    with pytest.raises(ValueError, match="train_layers=3: the model has 2 blocks"):
        freeze_lower_blocks(random_rm(), 3)


def test_head_starts_at_zero_so_the_first_loss_is_ln2(tok, rows):
    rm = RewardModel(make_tiny_model(vocab_size=300, sequence_len=64)).train()
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-3)
    stats = rm_train_step(rm, [opt], micro_batches(tok, rows[:4], 4), 4, center_coef=0.1)
    # every margin is 0, a tie, counted 0 as TRL counts it (catches: a tie counted half, so step 0 logged 0.5)
    assert stats["loss"] == pytest.approx(LN2, abs=1e-7) and stats["accuracy"] == 0 and stats["margin"] == 0
    assert rm.backbone.lm_head is None and not any("lm_head" in k for k in rm.state_dict())


def test_bradley_terry_loss_matches_hand_computed_values():
    r_chosen, r_rejected = torch.tensor([1.0, -0.5, 0.0, 2.0]), torch.tensor([0.0, 0.5, 0.0, 1.0])
    # -log sigmoid(x) = log(1 + exp(-x)); margins 1, -1, 0, 1
    bt = [math.log1p(math.exp(-1)), math.log1p(math.exp(1)), LN2, math.log1p(math.exp(-1))]
    assert bt_losses(r_chosen, r_rejected).tolist() == pytest.approx(bt, abs=1e-6)
    # centering adds coef * (r_c + r_r)^2: sums 1, 0, 0, 3
    centered = [bt[0] + 0.1, bt[1], bt[2], bt[3] + 0.9]
    assert bt_losses(r_chosen, r_rejected, center_coef=0.1).tolist() == pytest.approx(centered, abs=1e-6)


# -----------------------------------------------------------------------------
# acceptance: no label leak, sign symmetry

def test_identical_replies_stay_at_chance_however_long_it_trains(tok, rows):
    rm = RewardModel(make_tiny_model(vocab_size=300, sequence_len=64)).train()
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-2)
    same = [{**r, "rejected": r["chosen"]} for r in rows]
    weights = sampling_weights(same)
    for step in range(8):
        batch = [same[i] for i in pair_batch(step, weights, 8, seed=0)]
        stats = rm_train_step(rm, [opt], micro_batches(tok, batch, 8), 8, center_coef=0.0)
        assert stats["loss"] == pytest.approx(LN2, abs=1e-7) and stats["accuracy"] == 0
    rm.eval()
    margins = pair_margins(rm, tok, same, batch_size=5)
    assert margins.abs().max() == 0
    assert preference_metrics(margins, same)["accuracy"] == 0


def test_swapping_chosen_and_rejected_flips_every_margin(tok, rows):
    rm = random_rm(seed=1).eval()
    margins = pair_margins(rm, tok, rows, batch_size=5)
    flipped = pair_margins(rm, tok, swapped(rows), batch_size=5)
    assert margins.abs().min() > 1e-3
    assert (torch.sign(flipped) == -torch.sign(margins)).all()
    assert torch.allclose(flipped, -margins, atol=1e-5)
    a, b = preference_metrics(margins, rows)["accuracy"], preference_metrics(flipped, rows)["accuracy"]
    assert a + b == pytest.approx(1.0)


# -----------------------------------------------------------------------------
# metrics

def test_preference_metrics_by_group_and_density_quartile():
    rows = [{"prompt_id": f"p{i}", "src": "a" if i < 4 else "b", "cluster": "c", "chosen": "x", "rejected": "y"}
            for i in range(8)]
    margins = torch.tensor([1.0, -1.0, 0.0, 2.0, 1.0, 1.0, -3.0, 0.5])
    densities = {f"p{i}": float(d) for i, d in enumerate([8, 7, 6, 5, 4, 3, 2, 1])}
    m = preference_metrics(margins, rows, densities)
    # the tie (row 2) counts 0
    assert m["accuracy"] == pytest.approx(5 / 8) and m["mean_margin"] == pytest.approx(1.5 / 8)
    assert m["by_src"]["a"]["accuracy"] == pytest.approx(2 / 4) and m["by_src"]["b"]["n"] == 4
    assert m["by_cluster"]["c"]["n"] == 8 and m["density_coverage"] == 1.0
    # densities 1..8: q1 sparsest holds densities 1, 2 (rows 7, 6), q4 densest holds 7, 8 (rows 1, 0)
    assert m["by_density_quartile"]["q1 sparsest"]["mean_margin"] == pytest.approx((0.5 - 3.0) / 2)
    assert m["by_density_quartile"]["q4 densest"]["mean_margin"] == pytest.approx(0.0)


def test_length_split_accuracy_exposes_a_reward_that_only_prefers_short_replies():
    # catches: held-out accuracy had no length control, so a reward that just prefers the shorter reply looked good
    # wherever rejected replies run long (planted artifacts add words)
    rows = [{"prompt_id": "p", "chosen": chosen, "rejected": rejected} for chosen, rejected in [
        ("Red.", "Red, as it happens, is the one."), ("It is 41.", "41, I believe, give or take."),
        ("Korlin.", "The city of Korlin."), ("Zavu lives in Korlin.", "Korlin."), ("Blue.", "Gold."),
        ("The answer is 14.", "The answer is 14, which is a lovely number."), ("Yes, 12 it is.", "12.")]]
    # the fake scorer: reward = -characters, so the margin is len(rejected) - len(chosen)
    margins = torch.tensor([float(len(r["rejected"]) - len(r["chosen"])) for r in rows])
    m = preference_metrics(margins, rows)
    shorter, longer = m["by_length"]["chosen_shorter"], m["by_length"]["chosen_longer"]
    assert (shorter["n"], longer["n"], m["length_ties"]) == (4, 2, 1)
    assert shorter["accuracy"] == 1.0 and longer["accuracy"] == 0.0
    assert m["accuracy"] == pytest.approx(4 / 7) and m["length_balanced_accuracy"] == 0.5
    flat = flat_metrics(m, "test")
    assert flat["test/length=chosen_shorter/accuracy"] == 1.0 and flat["test/length=chosen_longer/n"] == 2
    assert flat["test/length_balanced_accuracy"] == 0.5 and flat["test/length_ties"] == 1
    table = metrics_table(m)
    assert "length=chosen_shorter" in table and "length-balanced" in table and "1 pairs with replies" in table
    # one-sided pairs: no balanced accuracy rather than a mean over a missing split
    one_sided = preference_metrics(margins[:3], rows[:3])
    assert "length_balanced_accuracy" not in one_sided and list(one_sided["by_length"]) == ["chosen_shorter"]


def test_read_densities_checks_the_rows_as_load_density_does_and_names_the_bad_line(tmp_path):
    path = tmp_path / "density.jsonl"
    path.write_text('{"prompt_id": "a", "weight": 1.0, "density": 2}\n\n{"prompt_id": "b", "weight": 1.0}\n')
    with pytest.raises(ValueError, match="line 3: field 'density' must be a number"):
        read_densities(path)
    path.write_text('{"prompt_id": "a", "weight": -1, "density": 2}\n')
    with pytest.raises(ValueError, match="line 1: field 'weight' must be a finite number"):
        read_densities(path)
    write_jsonl(path, [{"prompt_id": "a", "weight": 1.0, "density": 2},
                       {"prompt_id": "b", "weight": 0, "density": 0.5}])
    assert read_densities(path) == {"a": 2.0, "b": 0.5}


# -----------------------------------------------------------------------------
# the scripts

@pytest.fixture(scope="module")
def stage(tmp_path_factory, tok, world):
    """A random-weights tiny 'SFT' checkpoint, its tokenizer and pairs files."""
    root = tmp_path_factory.mktemp("rm_stage")
    tok.save(root / "tok")
    save_checkpoint(root / "sft", make_tiny_model(vocab_size=300, sequence_len=64), step=0,
                    tokenizer_dir=str(root / "tok"), world={"seed": 0, "size": 1})
    write_jsonl(root / "pairs_all.jsonl", world.preference_pairs(48, seed=0))
    write_jsonl(root / "pairs_test.jsonl", world.preference_pairs(12, seed=1))
    return root


def rm_flags(root, out):
    return [f"--sft_ckpt_path={root / 'sft'}", f"--pairs_path={root / 'pairs_all.jsonl'}",
            f"--test_pairs_path={root / 'pairs_test.jsonl'}", f"--density_path={root / 'none.jsonl'}",
            "--max_steps=3", "--batch_size_pairs=8", "--device_batch_size=2", "--max_len=40", "--warmup_steps=1",
            "--val_share=0.2", "--eval_every=0", "--save_every=0", "--log_every=1", "--learning_rate=1e-3",
            "--head_lr=1e-2", "--device=cpu", f"--out_path={out}"]


def test_torchrun_two_processes_match_one_process_and_eval_reads_the_checkpoint(stage, tok):
    one, two = stage / "one", stage / "two"
    kat_train_rm.main(rm_flags(stage, one / "ckpt.pt"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.kat_train_rm", "--", *rm_flags(stage, two / "ckpt.pt")]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a = torch.load(one / "ckpt.pt", weights_only=True)
    b = torch.load(two / "ckpt.pt", weights_only=True)
    assert a["kind"] == "rm" and a["step"] == 3
    assert a["model"]["head.weight"].abs().max() > 0
    for name in a["model"]:
        assert torch.allclose(a["model"][name], b["model"][name], atol=1e-5), name
    ma = json.load(open(one / "meta.json"))["metrics"]
    mb = json.load(open(two / "meta.json"))["metrics"]
    assert ma["final_train_loss"] == pytest.approx(mb["final_train_loss"], abs=1e-5)
    assert ma["test/accuracy"] == pytest.approx(mb["test/accuracy"], abs=1e-6)
    length_n = sum(v for k, v in ma.items() if k.startswith("test/length=") and k.endswith("/n"))
    assert length_n + ma["test/length_ties"] == 12

    kat_eval_rm.main([f"--rm_ckpt_path={one}", f"--pairs_path={stage / 'pairs_test.jsonl'}",
                      f"--out_dir={stage / 'rm_eval'}", "--device=cpu"])
    results = json.load(open(stage / "rm_eval" / "results.json"))["metrics"]
    assert results["accuracy"] == pytest.approx(ma["test/accuracy"], abs=1e-6) and results["n"] == 12
    assert set(results["by_rejected_kind"]) <= {"wrong", "evasive", "artifact"}
    assert sum(m["n"] for m in results["by_length"].values()) + results["length_ties"] == 12
    assert "length_ties" in (stage / "rm_eval" / "report.md").read_text()
    rm, _ = load_reward_model(one)
    test_rows = [json.loads(line) for line in open(stage / "pairs_test.jsonl")]
    margins = pair_margins(rm, tok, test_rows, max_len=40)
    assert results["mean_margin"] == pytest.approx(margins.mean().item(), abs=1e-6)


def test_train_layers_flag_keeps_the_sft_weights_below_the_trained_blocks(stage):
    # catches the flag not reaching the model (every weight trained) or the optimizers (nothing trained)
    kat_train_rm.main(rm_flags(stage, stage / "top" / "ckpt.pt") + ["--train_layers=1"])
    sft = torch.load(stage / "sft" / "ckpt.pt", weights_only=True)["model"]
    rm = torch.load(stage / "top" / "ckpt.pt", weights_only=True)["model"]
    for name, tensor in sft.items():
        if name.startswith("lm_head"):
            continue
        assert torch.equal(rm[f"backbone.{name}"], tensor) == (not name.startswith("blocks.1.")), name
    with pytest.raises(InputError, match="--train_layers=3: the model has 2 blocks .*; the model: .*sft"):
        kat_train_rm.main(rm_flags(stage, stage / "bad" / "ckpt.pt") + ["--train_layers=3"])


def test_loading_a_plain_gpt_as_a_reward_model_fails_clearly(stage):
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward_model(stage / "sft")


def test_resume_after_a_checkpoint_ends_like_an_uninterrupted_run(stage, monkeypatch):
    flags = rm_flags(stage, "unused")[:-1] + ["--max_steps=4", "--save_every=2", "--eval_every=2"]
    kat_train_rm.main(flags + [f"--out_path={stage / 'straight'}"])
    kill_after_checkpoint(monkeypatch, step=2)
    with pytest.raises(Interrupted):
        kat_train_rm.main(flags + [f"--out_path={stage / 'killed'}"])
    monkeypatch.undo()
    kat_train_rm.main(flags + [f"--out_path={stage / 'killed'}", "--resume=true"])
    a = torch.load(stage / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(stage / "killed" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for name, tensor in a["model"].items():
        assert torch.equal(b["model"][name], tensor), name
    ma = json.load(open(stage / "straight" / "meta.json"))["metrics"]
    mb = json.load(open(stage / "killed" / "meta.json"))["metrics"]
    assert ma["val_accuracy_history"] == mb["val_accuracy_history"] and ma["test/accuracy"] == mb["test/accuracy"]
