"""
DPO against independent expectations: hand-computed losses for every loss type (IPO on per-token averages), log-probs
equal to a per-token loop over full forwards of each row alone (reply tokens only; in a multi-turn chat the final
reply only), exactly ln 2 while the policy is the reference, ties counted 0, and a run interrupted right after a
checkpoint that resumes to the same weights as an uninterrupted one.
"""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import LN2, MULTI_TURN, ROOT, Interrupted, kill_after_checkpoint, make_tiny_model, render_pairs
from nanochat.batching import collate_targets, cut_left
from nanochat.checkpoint import save_checkpoint
from nanochat.dpo import dpo_losses, dpo_train_step, pair_logprobs, preference_eval, sequence_logprobs
from nanochat.preference import pack_pairs, split_pair
from scripts import kat_train_dpo


@pytest.fixture(scope="module")
def rows(world):
    return world.preference_pairs(8, seed=0)


def naive_logprob(model, ids, mask):
    """Sum over reply tokens of log p(token | all before it), from one full forward of the row alone."""
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t])


def test_losses_match_hand_computed_values():
    pi_c, pi_r = torch.tensor([-10.0, -5.0]), torch.tensor([-14.0, -3.0])
    ref_c, ref_r = torch.tensor([-11.0, -5.0]), torch.tensor([-12.0, -5.0])
    # h = (pi_c - pi_r) - (ref_c - ref_r) = (4 - 1, -2 - 0) = (3, -2); beta = 0.1
    expected = {"sigmoid": [math.log1p(math.exp(-0.3)), math.log1p(math.exp(0.2))],  # -log sigmoid(beta h)
                "ipo": [(3 - 5) ** 2, (-2 - 5) ** 2],  # (h - 1 / (2 beta))^2
                "hinge": [0.7, 1.2]}  # max(0, 1 - beta h)
    for loss_type, values in expected.items():
        losses, chosen, rejected = dpo_losses(pi_c, pi_r, ref_c, ref_r, beta=0.1, loss_type=loss_type)
        assert losses.tolist() == pytest.approx(values, abs=1e-6), loss_type
        assert chosen.tolist() == pytest.approx([0.1, 0.0]) and rejected.tolist() == pytest.approx([-0.2, 0.2])
    with pytest.raises(ValueError, match="loss_type"):
        dpo_losses(pi_c, pi_r, ref_c, ref_r, loss_type="kto")


def final_reply_logprob(model, tok, messages, reply, max_len=None):
    """
    Sum of log p(token | all before it) over the last len(reply) + 1 tokens (the final reply and its end token) of
    the whole chat's render, cut as the stages cut it, from one full forward of the row alone: no render mask read.
    """
    ids, _ = tok.render_conversation(messages + [{"role": "assistant", "content": reply}], max_tokens=None)
    ids = cut_left(ids, max_len)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)
    n = len(tok.encode(reply)) + 1
    assert ids[-1] == tok.encode_special("<|assistant_end|>")
    return sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n, len(ids)))


def test_a_multi_turn_pair_scores_the_final_reply_only_with_and_without_truncation(tok):
    # catches: every assistant turn of the chat was scored (render_conversation's mask), so a multi-turn pair's
    # log-probs, logps/* and held-out accuracy were diluted by the history, and with --max_len DPO trained on it
    model = make_tiny_model(vocab_size=300, sequence_len=256)
    rows = [{"messages": MULTI_TURN, "chosen": "Zavu is 41.", "rejected": "Zavu is 41 years old, I think."},
            {"messages": MULTI_TURN[3:], "chosen": "Red.", "rejected": "Zavu likes green."}]
    # 32 tokens: every reply fits whole, every render is cut inside its history
    assert all(len(tok.encode(r[side])) + 1 < 31 < len(tok.render_for_completion(r["messages"]))
               for r in rows for side in ("chosen", "rejected"))
    def tokens(reply):
        return len(tok.encode(reply)) + 1  # and the end token

    def context(row, side, max_len):  # both replies read the same prompt tokens, cut to fit the longer reply
        return max_len and max_len - max(tokens(row["chosen"]), tokens(row["rejected"])) + tokens(row[side])

    for max_len in (None, 32):
        got = pair_logprobs(model, tok, rows, max_len=max_len)
        for side in ("chosen", "rejected"):
            expected = [final_reply_logprob(model, tok, r["messages"], r[side], context(r, side, max_len))
                        for r in rows]
            assert got[side].tolist() == pytest.approx(expected, rel=2e-6, abs=1e-4), (side, max_len)
            assert got[f"{side}_tokens"].tolist() == [len(tok.encode(r[side])) + 1 for r in rows]


def test_logprobs_sum_reply_tokens_only_and_match_a_per_token_loop(tok, rows):
    model = make_tiny_model(vocab_size=300, sequence_len=64)
    rendered = render_pairs(tok, rows[:4])
    assert len({len(ids) for ids, _ in rendered}) > 2  # right padding is exercised
    inputs, targets = collate_targets(rendered)
    got = sequence_logprobs(model, inputs, targets)
    expected = [naive_logprob(model, ids, mask) for ids, mask in rendered]
    # fp32 sums of hundreds of nats: a relative tolerance, far below one token's log-prob
    assert got.tolist() == pytest.approx(expected, rel=2e-6, abs=1e-4)
    # scored positions are exactly the reply's tokens and its end token
    n_reply = [len(tok.encode(r[side])) + 1 for side in ("chosen", "rejected") for r in rows[:4]]
    assert (targets >= 0).sum(1).tolist() == n_reply
    got = pair_logprobs(model, tok, rows[:4], batch_size=3)
    assert torch.cat([got["chosen"], got["rejected"]]).tolist() == pytest.approx(expected, rel=2e-6, abs=1e-4)
    assert torch.cat([got["chosen_tokens"], got["rejected_tokens"]]).tolist() == n_reply


HAND_LOSS = {"sigmoid": lambda h, beta: math.log1p(math.exp(-beta * h)),
             "ipo": lambda h, beta: (h - 1 / (2 * beta)) ** 2,
             "hinge": lambda h, beta: max(0.0, 1 - beta * h)}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_fixed_batch_step_equals_hand_computation_and_is_ln2_at_step_0(tok, rows, loss_type):
    beta = 0.1
    policy = make_tiny_model(seed=1, vocab_size=300, sequence_len=64).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    batch = render_pairs(tok, rows[:4])  # chosen 0-3, then rejected 0-3
    micro = [pack_pairs([split_pair(tok, r) for r in rows[:2]]), pack_pairs([split_pair(tok, r) for r in rows[2:4]])]
    first = dpo_train_step(policy, reference, [opt], micro, 4, beta=beta, loss_type=loss_type)
    assert first["loss"] == pytest.approx(HAND_LOSS[loss_type](0.0, beta), abs=1e-5)
    if loss_type == "sigmoid":
        assert first["loss"] == pytest.approx(LN2, abs=1e-7)  # float32 ln 2: policy == reference to the bit
    # a tie counts 0, as TRL's rewards/accuracies (catches: a tie counted half, so step 0 logged 0.5)
    assert first["rewards/margins"] == 0 and first["rewards/accuracies"] == 0

    # the policy has moved: the next loss, by hand from per-token loops over each row alone
    pi = [naive_logprob(policy, ids, mask) for ids, mask in batch]
    ref = [naive_logprob(reference, ids, mask) for ids, mask in batch]
    if loss_type == "ipo":
        # IPO on log-probs averaged per reply token, as the IPO paper and TRL (catches: IPO on summed log-probs)
        tokens = [sum(mask[1:]) for _, mask in batch]
        pi, ref = [p / n for p, n in zip(pi, tokens)], [r / n for r, n in zip(ref, tokens)]
    h = [(pi[i] - pi[i + 4]) - (ref[i] - ref[i + 4]) for i in range(4)]
    second = dpo_train_step(policy, reference, [opt], micro, 4, beta=beta, loss_type=loss_type)
    assert max(abs(x) for x in h) > (0.01 if loss_type == "ipo" else 0.1), "one step should move the policy"
    assert second["loss"] == pytest.approx(sum(HAND_LOSS[loss_type](x, beta) for x in h) / 4, rel=1e-5, abs=1e-4)
    assert second["rewards/chosen"] == pytest.approx(sum(beta * (pi[i] - ref[i]) for i in range(4)) / 4, abs=1e-4)
    assert second["rewards/margins"] == pytest.approx(beta * sum(h) / 4, abs=1e-4)
    assert second["rewards/accuracies"] == sum(x > 0 for x in h) / 4


# -----------------------------------------------------------------------------
# the script

@pytest.fixture(scope="module")
def stage(tmp_path_factory, tok, world):
    """A random-weights tiny 'SFT' checkpoint of the world, its tokenizer, pairs files and density weights."""
    root = tmp_path_factory.mktemp("dpo_stage")
    tok.save(root / "tok")
    save_checkpoint(root / "sft", make_tiny_model(vocab_size=300, sequence_len=64), step=0,
                    tokenizer_dir=str(root / "tok"), world={"seed": 0, "size": 1})
    pairs = world.preference_pairs(40, seed=0)
    (root / "pairs_all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (root / "pairs_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in world.preference_pairs(6, seed=1)))
    g = torch.Generator().manual_seed(0)
    (root / "density.jsonl").write_text("".join(
        json.dumps({"prompt_id": pid, "density": 1.0, "weight": torch.rand(1, generator=g).item() + 0.1,
                    "knn_mean_distance": 1.0}) + "\n" for pid in dict.fromkeys(r["prompt_id"] for r in pairs)))
    return root


def dpo_flags(root):
    return [f"--sft_ckpt_path={root / 'sft'}", f"--pairs_path={root / 'pairs_all.jsonl'}",
            f"--test_pairs_path={root / 'pairs_test.jsonl'}", f"--density_path={root / 'density.jsonl'}",
            "--max_steps=4", "--batch_size_pairs=4", "--device_batch_size=2", "--max_len=40", "--warmup_steps=1",
            "--learning_rate=1e-3", "--val_share=0.2", "--eval_every=2", "--save_every=2", "--log_every=1",
            "--eval_questions=4", "--eval_max_new_tokens=4", "--device=cpu"]


def test_script_resumes_to_the_same_weights_and_reports_sft_beside_dpo(stage, tmp_path, monkeypatch):
    flags = dpo_flags(stage)
    kat_train_dpo.main(flags + [f"--out_dir={tmp_path / 'straight'}"])

    kill_after_checkpoint(monkeypatch, step=2)
    with pytest.raises(Interrupted):
        kat_train_dpo.main(flags + [f"--out_dir={tmp_path / 'killed'}"])
    monkeypatch.undo()
    kat_train_dpo.main(flags + [f"--out_dir={tmp_path / 'killed'}", "--resume=true"])

    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and a["extra"]["loss_type"] == "sigmoid"
    for name, tensor in a["model"].items():
        assert torch.equal(b["model"][name], tensor), name
    ma = json.load(open(tmp_path / "straight" / "meta.json"))["metrics"]
    mb = json.load(open(tmp_path / "killed" / "meta.json"))["metrics"]
    assert ma["final_train_loss"] == mb["final_train_loss"]
    assert ma["val_accuracy_history"] == mb["val_accuracy_history"]
    for key in ("test/accuracy", "test/summed_accuracy", "world/artifact_rate", "world/correct"):
        assert f"sft/{key}" in ma and f"dpo/{key}" in ma, key
    assert ma["sft/test/implicit_accuracy"] == 0  # every implicit margin of SFT is 0: a tie, counted 0
    report = (tmp_path / "straight" / "report.md").read_text()
    assert "SFT" in report and "DPO" in report and "rewards/margins" in report


def test_preference_accuracy_is_per_token_and_the_summed_one_is_reported_beside_it():
    # pair 0: chosen -4 over 2 tokens (-2 per token), rejected -6 over 4 (-1.5): the sum prefers chosen, per token not
    # pair 1: chosen -3 over 3 (-1), rejected -6 over 3 (-2): both prefer chosen
    policy = {"chosen": torch.tensor([-4.0, -3.0]), "rejected": torch.tensor([-6.0, -6.0]),
              "chosen_tokens": torch.tensor([2.0, 3.0]), "rejected_tokens": torch.tensor([4.0, 3.0])}
    reference = {**policy, "chosen": torch.tensor([-4.0, -2.0])}
    m = preference_eval(policy, reference, beta=0.5)
    assert m["accuracy"] == 0.5 and m["summed_accuracy"] == 1.0
    # implicit margins: beta * ((-4 + 6) - (-4 + 6), (-3 + 6) - (-2 + 6)) = (0, -0.5): a tie and a miss, both 0
    assert m["implicit_accuracy"] == 0 and m["implicit_margin"] == pytest.approx(-0.25)


def test_torchrun_two_processes_match_one_process(stage, tmp_path):
    flags = dpo_flags(stage) + ["--max_steps=3", "--save_every=0", "--eval_every=0", "--batch_size_pairs=4",
                                "--device_batch_size=1"]
    kat_train_dpo.main(flags + [f"--out_dir={tmp_path / 'one'}"])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.kat_train_dpo", "--", *flags, f"--out_dir={tmp_path / 'two'}"]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    ma = json.load(open(tmp_path / "one" / "meta.json"))["metrics"]
    mb = json.load(open(tmp_path / "two" / "meta.json"))["metrics"]
    for key in ("final_train_loss", "final_train_rewards/margins", "dpo/test/accuracy", "dpo/world/artifact_rate"):
        assert ma[key] == pytest.approx(mb[key], abs=1e-5), key
