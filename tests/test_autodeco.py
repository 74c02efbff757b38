"""
AutoDeco (nanochat/autodeco.py, scripts/kat_construct_autodeco.py, kat_train_autodeco.py,
kat_pretty_print_temp_diag.py): the min-p target against the engine's own min-p filter, the Goldilocks counts,
the losses by hand, the quantile the hinge learns, checkpoints, decoding, data selection, diagnostics, torchrun
and resume.
"""

import io
import json
import math
import os
import signal
import sys
import time

import pytest
import torch

from conftest import make_tiny_model, sigkill_when, torchrun
from nanochat.autodeco import (BEYOND_K, CAPPED, EASY, TOPK, AutoDecoConfig, autodeco_step, check_chat_rows, chat_rows,
                               decode_hook, goldilocks_counts, hinge_target, load_autodeco, open_chat_dataset,
                               required_temperature, select_tokens, target_rank, temperature_losses, token_codes)
from nanochat.checkpoint import CheckpointError, save_checkpoint
from nanochat.common import InputError
from nanochat.engine import Engine, sample_next


@pytest.fixture(scope="module")
def stage(tmp_path_factory, tok):
    """A tiny SFT checkpoint of the seed-0 world, fresh heads on it, and a small chat file in ultrachat's schema."""
    from scripts import kat_construct_autodeco

    root = tmp_path_factory.mktemp("autodeco")
    tok.save(root / "tokenizer")
    save_checkpoint(root / "sft", make_tiny_model(vocab_size=300, sequence_len=128), 0, str(root / "tokenizer"),
                    world={"seed": 0, "size": 1})
    kat_construct_autodeco.main([f"--base_model_name_or_path={root / 'sft'}", f"--output_dir={root / 'init'}"])
    chats = [{"prompt": f"Where does Zavu live? ({i})", "prompt_id": str(i),
              "messages": [{"role": "user", "content": f"Where does Zavu live? ({i})"},
                           {"role": "assistant", "content": "Zavu lives in Korlin, by the river."}]} for i in range(24)]
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return root


def train_flags(root, out_dir, **overrides):
    flags = {"model_name_or_path": root / "init", "output_dir": out_dir, "max_steps": 4, "logging_steps": 1,
             "per_device_train_batch_size": 4, "max_length": 64, "eval_samples": 4, "save_steps": 0,
             "temp_diag_steps": 2, "device": "cpu", "learning_rate": 1e-2, "goldilocks_easy_frac": 0.3,
             "goldilocks_topk": 100}  # a random tiny model ranks most ground truths far down
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items()]


def heads_state(out_dir):
    return torch.load(out_dir / "ckpt.pt", weights_only=True)["model"]


# -----------------------------------------------------------------------------
# the min-p target

def test_t_req_is_where_the_engines_min_p_starts_keeping_the_ground_truth():
    # catches: T_req off by a factor (log10, ln(rho) for ln(1/rho), a missing softcap or temperature), checked
    # against the engine's own min-p filter, not against the formula: the ground truth is sampled at
    # T_req (1 + eps) and never at T_req (1 - eps)
    g = torch.Generator().manual_seed(0)
    rho, eps, draws = 0.1, 1e-3, 3000
    logits = torch.randn(12, 8, generator=g) * 3
    targets = (logits.argmax(-1) + 1 + torch.randint(0, 7, (12,), generator=g)) % 8  # never the argmax
    t_req = required_temperature(logits, targets, rho)
    assert (t_req > 0).all()
    for scale, survives in ((1 + eps, True), (1 - eps, False)):
        rows = logits.repeat_interleave(draws, 0)
        temperature = (t_req * scale).repeat_interleave(draws)
        tokens, _ = sample_next(rows, temperature, min_p=rho, generator=torch.Generator().manual_seed(1))
        seen = (tokens.view(12, draws) == targets[:, None]).any(1)
        assert seen.tolist() == [survives] * 12, scale


def test_ties_with_the_top_logit_are_rank_1_and_need_no_temperature():
    # catches: a rank that counts ties (>= instead of >), which would call a tied ground truth hard
    logits = torch.tensor([[2.0, 5.0, 5.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    targets = torch.tensor([2, 1])
    assert target_rank(logits, targets).tolist() == [1, 3]
    t_req = required_temperature(logits, targets, 0.1)
    assert t_req[0].item() == 0 and t_req[1].item() == pytest.approx(2 / math.log(10))


# -----------------------------------------------------------------------------
# the Goldilocks filter

@pytest.mark.parametrize("num_easy, num_topk, frac, expected", [
    (800, 150, 0.1, (17, 149)),  # the example: n = floor(150 / 0.9) = 166, easy = round(16.6)
    (10, 500, 0.1, (10, 90)),    # easy is scarce: n = floor(10 / 0.1) = 100
    (100, 3, 0.7, (7, 3)),       # 3 / 0.3 is 9.999... in floating point and must count as 10
    (800, 150, 0.0, (0, 150)),
    (800, 150, 1.0, (800, 0)),
    (800, 150, -1, (800, 150)),  # the natural ratio
    (0, 150, 0.1, (0, 150)),     # an empty bucket: the other is kept whole
    (800, 0, 0.1, (800, 0)),
    (0, 0, 0.1, (0, 0)),
])
def test_goldilocks_counts(num_easy, num_topk, frac, expected):
    # catches: keeping the scarce bucket literally whole (17 + 150), ceil instead of floor, a float floor that
    # loses one, f = 0/1/-1 special cases falling through to the formula (division by zero), an empty bucket that
    # empties the selection
    assert goldilocks_counts(num_easy, num_topk, frac) == expected


def test_goldilocks_selection_draws_those_counts_seeded_and_never_beyond_k():
    # catches: the selection taking the first tokens instead of a seeded random subset, tokens beyond k or dropped
    # by the cap being selected, the counts not reaching the grid
    codes = torch.full((40, 50), TOPK)
    codes.view(-1)[:1850] = EASY  # 1850 easy, 150 top-k
    codes[0, :5] = 3              # beyond k
    codes[1, :5] = CAPPED
    cfg = AutoDecoConfig(goldilocks_filter=True, goldilocks_easy_frac=0.1)
    a = select_tokens(codes, cfg, torch.Generator().manual_seed(0))
    b = select_tokens(codes, cfg, torch.Generator().manual_seed(0))
    c = select_tokens(codes, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    keep_easy, keep_topk = goldilocks_counts(int((codes == EASY).sum()), int((codes == TOPK).sum()), 0.1)
    assert (a & (codes == EASY)).sum() == keep_easy and (a & (codes == TOPK)).sum() == keep_topk
    assert not a[0, :5].any() and not a[1, :5].any()
    first_easy = (codes.view(-1) == EASY).nonzero().squeeze(1)[:keep_easy]
    assert not a.view(-1)[first_easy].all()  # a random subset, not simply the first easy tokens
    assert not torch.equal(a & (codes == EASY), c & (codes == EASY))


# -----------------------------------------------------------------------------
# the losses

def test_hinge_and_regularisers_by_hand():
    # catches: a hinge of the wrong sign, the regulariser on the wrong side, a missing weight or square
    t_hat, t_req = torch.tensor([0.5, 1.0, 1.5]), torch.tensor([1.0, 0.2, 1.5])
    linear = temperature_losses(t_hat, t_req, 2.0, 0.1, "linear")
    overshoot = temperature_losses(t_hat, t_req, 2.0, 0.1, "overshoot_sq")
    assert linear.tolist() == pytest.approx([2 * 0.5 + 0.05, 0.1, 0.15])
    assert overshoot.tolist() == pytest.approx([2 * 0.5, 0.1 * 0.8 ** 2, 0.0])
    t_req = torch.tensor([0.5, 3.0])
    assert hinge_target(t_req, 1.0, "clamp").tolist() == [0.5, 1.0]
    assert hinge_target(t_req, 1.0, "drop").tolist() == [0.5, 3.0]  # drop removes the token instead
    ranks = torch.tensor([2, 2])
    assert token_codes(ranks, t_req, 10, 1.0, "drop").tolist() == [TOPK, CAPPED]
    assert token_codes(ranks, t_req, 10, 1.0, "clamp").tolist() == [TOPK, TOPK]
    ranks = torch.tensor([1, 2, 10, 11])
    assert token_codes(ranks, torch.zeros(4), 10, None, "clamp").tolist() == [EASY, TOPK, TOPK, BEYOND_K]


def test_the_linear_hinge_learns_the_90th_percentile():
    # catches: a regulariser or hinge weighted so that the optimum is not the (1 - w_r / w_h) quantile (the
    # objective is the pinball loss of that quantile up to a constant)
    g = torch.Generator().manual_seed(0)
    t_req = -torch.log(torch.rand(4000, generator=g)) * 0.5 + torch.rand(4000, generator=g)  # a skewed spread
    t = torch.tensor(1.0, requires_grad=True)
    opt = torch.optim.Adam([t], lr=0.02)
    for step in range(1500):
        for group in opt.param_groups:
            group["lr"] = 0.02 * (1 - step / 1500) + 1e-4
        loss = temperature_losses(t.expand(4000), t_req, 1.0, 0.1, "linear").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert t.item() == pytest.approx(torch.quantile(t_req, 0.9).item(), abs=0.01)


def test_an_empty_selection_backpropagates_a_zero(stage, monkeypatch):
    # catches: an empty selection returning a constant without a graph (backward fails) or skipping the step
    # (this rank would miss the gradient all-reduce the others wait in)
    from nanochat import autodeco
    base, heads, _ = load_autodeco(stage / "init")
    heads.train()
    inputs = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        targets = base(inputs).argmax(-1)  # every target the argmax: all easy, and f = 0 selects none
    seen = {}

    def record(model, optimizers, grad_clip):
        seen["grads"] = [p.grad.clone() for p in model.temp_head.parameters()]
        return 0.0
    monkeypatch.setattr(autodeco, "optimizer_step", record)
    cfg = AutoDecoConfig(goldilocks_filter=True, goldilocks_easy_frac=0.0)
    stats, _ = autodeco_step(base, heads, [], inputs, targets, cfg, step=0)
    assert stats["selected"] == 0 and stats["valid"] == 24 and stats["loss"] == 0
    assert len(seen["grads"]) == 4 and all(g is not None and not g.any() for g in seen["grads"])


def test_a_cap_clamps_the_target_or_drops_the_token(stage):
    # catches: --temp_target_cap parsed but not applied in the step: at T = 1 (fresh heads) a cap far below 1 makes
    # every hinge 0 with clamp (the loss is w_r * 1), and with drop leaves only the tokens with T_req = 0
    base, heads, _ = load_autodeco(stage / "init")
    inputs = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = base(inputs).view(-1, 300)
    targets[0, :6] = logits[:6].argmax(-1)  # some easy tokens
    t_req = required_temperature(logits, targets.view(-1), 0.1)
    assert (t_req > 1.2).any() and (t_req == 0).any()  # the cap has something to do
    off = dict(goldilocks_filter=False, temp_reg_weight=0.1, cap_mode="clamp")
    plain, _ = autodeco_step(base, heads, [], inputs, targets, AutoDecoConfig(**off), step=0)
    clamped, _ = autodeco_step(base, heads, [], inputs, targets, AutoDecoConfig(**off, temp_target_cap=1e-6), step=0)
    dropped, _ = autodeco_step(base, heads, [], inputs, targets,
                               AutoDecoConfig(**off | {"cap_mode": "drop"}, temp_target_cap=1e-6), step=0)
    assert plain["temp_loss"] > 0.1 + 1e-3 and clamped["temp_loss"] == pytest.approx(0.1)
    assert clamped["selected"] == 32 and dropped["selected"] == int((t_req == 0).sum()) and dropped["mean_t_req"] == 0


# -----------------------------------------------------------------------------
# checkpoints and decoding

def test_heads_only_round_trip_and_a_changed_base_is_refused(stage, tmp_path):
    # catches: the base's weights saved with the heads (a 1000x larger file), heads loaded into the wrong
    # modules, a fingerprint that misses a change of the base's weights
    import shutil

    from scripts import kat_construct_autodeco
    saved = heads_state(stage / "init")
    assert set(saved) == {f"{head}.{i}.{w}" for head in ("temp_head", "top_p_head") for i in (0, 2)
                          for w in ("weight", "bias")}
    base, heads, payload = load_autodeco(stage / "init")
    assert payload["min_p_ratio"] == 0.1 and payload["train_top_p"] is False and payload["world"]["seed"] == 0
    for name, tensor in heads.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert torch.equal(base.wte.weight, torch.load(stage / "sft" / "ckpt.pt", weights_only=True)["model"]["wte.weight"])
    h = torch.randn(3, 64)
    assert heads.temperature(h).tolist() == [1.0] * 3  # zero last layers: exactly T = 1 at init

    shutil.copytree(stage / "sft", tmp_path / "sft")
    kat_construct_autodeco.main([f"--base_model_name_or_path={tmp_path / 'sft'}", f"--output_dir={tmp_path / 'init'}"])
    load_autodeco(tmp_path / "init")
    changed = make_tiny_model(seed=5, vocab_size=300, sequence_len=128)
    save_checkpoint(tmp_path / "sft", changed, 0, str(stage / "tokenizer"), world={"seed": 0, "size": 1})
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_autodeco(tmp_path / "init")


def test_a_constant_temperature_head_samples_like_a_fixed_temperature(stage):
    # catches: a hook that feeds the engine other temperatures than the head's (unclamped, per-token from the wrong
    # input), or a top-p when none was asked for: both change the tokens of a fixed-seed run
    base, heads, _ = load_autodeco(stage / "init")
    with torch.no_grad():
        heads.temp_head[2].bias.fill_(0.7)  # last layer zero but its bias: T = 2 sigmoid(0.7) everywhere
    t0 = heads.temperature(torch.zeros(1, 64)).item()
    assert 1.3 < t0 < 1.4
    prompts = [[1, 5, 9, 33], [7, 8]]
    engine = Engine(base)
    fixed = engine.generate(prompts, num_samples=3, max_new_tokens=12, temperature=t0, min_p=0.1, seed=3)
    hooked = engine.generate(prompts, num_samples=3, max_new_tokens=12, min_p=0.1, seed=3,
                             decode_hook=decode_hook(heads, use_top_p=False))
    assert torch.equal(fixed.tokens, hooked.tokens)
    assert torch.equal(hooked.temperatures, torch.full_like(hooked.temperatures, t0) * hooked.mask)
    at_one = engine.generate(prompts, num_samples=3, max_new_tokens=12, temperature=1.0, min_p=0.1, seed=3)
    assert not torch.equal(at_one.tokens, hooked.tokens)  # the temperature matters at this seed


# -----------------------------------------------------------------------------
# data

def test_the_split_is_asked_only_on_a_terminal(tmp_path, monkeypatch):
    # catches: input() called without a terminal (CI would hang), a tty answer ignored
    import datasets
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "id": "1"}
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list([row] * 3),
                          "test_sft": datasets.Dataset.from_list([row] * 2)}).save_to_disk(str(tmp_path / "ds"))

    def no_input(prompt=""):
        raise AssertionError("asked without a terminal")
    monkeypatch.setattr("builtins.input", no_input)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    rows, column, label = open_chat_dataset(str(tmp_path / "ds"))
    assert (len(rows), column, label) == (3, "messages", f"{tmp_path / 'ds'}[train_sft]")
    assert len(open_chat_dataset(str(tmp_path / "ds"), split="test_sft")[0]) == 2
    with pytest.raises(InputError, match="no such split .*train_sft"):
        open_chat_dataset(str(tmp_path / "ds"), split="validation")

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stdin", Terminal(""))
    monkeypatch.setattr("builtins.input", lambda prompt="": "test_sft")
    assert len(open_chat_dataset(str(tmp_path / "ds"))[0]) == 2


def test_malformed_rows_stop_the_run_naming_the_first_bad_row(tmp_path, monkeypatch):
    # catches: malformed rows reaching the tokenizer mid-run (a traceback), an error without the file/row/field
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "human", "content": "hi"}]}
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(bad if i in (3, 5, 8) else good) + "\n" for i in range(10)))
    rows, column, label = open_chat_dataset(str(path))
    with pytest.raises(InputError, match=r"3 of 10 sampled rows .*chats.jsonl row 3: field 'messages\[0\].role'"):
        check_chat_rows(rows, column, label, seed=0)
    path.write_text("".join(json.dumps(bad if i == 3 else good) + "\n" for i in range(20)))  # 1 in 20: tolerated
    rows, column, label = open_chat_dataset(str(path))
    check_chat_rows(rows, column, label, seed=0)
    conversations, skipped = chat_rows(rows, column, label, 20, seed=0)
    assert len(conversations) == 19 and len(skipped) == 1 and "row 3" in skipped[0]


def test_a_hub_id_offline_fails_fast_and_a_missing_file_is_named(monkeypatch):
    # catches: a hub download attempted offline (minutes of retries), a typo'd path taken for a hub id
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(InputError, match="ultrachat_200k.*hub is out of reach.*HF_HUB_OFFLINE"):
        open_chat_dataset("HuggingFaceH4/ultrachat_200k")
    assert time.time() - t0 < 30
    with pytest.raises(InputError, match="no such file"):
        open_chat_dataset("./missing.jsonl")


# -----------------------------------------------------------------------------
# the scripts

def test_training_writes_heads_diagnostics_and_a_readable_report(stage, tmp_path, capsys):
    # catches: diagnostics missing a field the pretty-printer or a reader needs, a hinge gap or min-p verdict that
    # disagree with the probabilities they describe, a JSONL data set in ultrachat's schema not loading
    from scripts import kat_pretty_print_temp_diag, kat_train_autodeco
    out = tmp_path / "run"
    kat_train_autodeco.main(train_flags(stage, out, dataset_name=stage / "chats.jsonl"))
    log = capsys.readouterr().out
    assert "step     4/4 | loss" in log and "min-p keeps" in log and "chats.jsonl, column messages" in log
    files = sorted(os.listdir(out / "temp_diagnostics"))
    assert files == ["step_0000002.json", "step_0000004.json"]
    record = json.loads((out / "temp_diagnostics" / files[-1]).read_text())
    fields = {"step", "knobs", "valid_tokens", "selected_tokens", "realised_easy_frac", "t_req", "examples"}
    assert fields <= set(record)
    assert record["knobs"]["min_p_ratio"] == 0.1 and set(record["t_req"]) == {"valid", "selected"}
    assert 1 <= len(record["examples"]) <= 3
    for ex in record["examples"]:
        assert ex["hinge_gap"] == pytest.approx(ex["required_temperature"] - ex["predicted_temperature"])
        assert ex["min_p"]["satisfied"] == (ex["ground_truth"]["prob_at_predicted_t"] >= ex["min_p"]["threshold"])
        # the analytic target and the probabilities agree: kept iff T_req <= T (away from the boundary)
        if abs(ex["hinge_gap"]) > 1e-4:
            assert ex["min_p"]["satisfied"] == (ex["hinge_gap"] < 0)
        assert len(ex["top_unscaled"]) == 5 and ex["context_ids"] and ex["ground_truth"]["rank_unscaled"] >= 1
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "autodeco" and meta["extra"]["min_p_ratio"] == 0.1
    assert "eval_mean_temperature" in meta["metrics"] and "eval_t_req_p90" in meta["metrics"]
    assert "Held-out" in (out / "report.md").read_text()
    base, heads, payload = load_autodeco(out)  # the trained heads load on the same base
    assert payload["lineage"][-1]["kind"] == "autodeco"
    # --completion_only_loss false trains on every next token, not only the assistant's
    valid = {}
    for only in ("true", "false"):
        flags = dict(max_steps=1, eval_samples=0, temp_diag_enabled="false", completion_only_loss=only)
        kat_train_autodeco.main(train_flags(stage, tmp_path / only, dataset_name=stage / "chats.jsonl", **flags))
        valid[only] = json.loads((tmp_path / only / "meta.json").read_text())["metrics"]["final_valid"]
    assert valid["false"] > 2 * valid["true"] > 0

    kat_pretty_print_temp_diag.main([f"--path={out / 'temp_diagnostics'}", "--num-files", "2", "--topk", "3",
                                     "--max-context-chars", "20"])
    text = capsys.readouterr().out
    assert "step_0000002.json: step 2" in text and "step_0000004.json: step 4" in text
    assert "hinge gap" in text and "min-p 0.1" in text and "T_req over selected tokens" in text
    contexts = [line for line in text.splitlines() if line.startswith("context: ")]
    assert contexts and all(len(line) <= len("context: ") + 2 + 3 + 20 + 2 for line in contexts)


def test_two_processes_train_the_heads_one_process_does(stage, tmp_path):
    # catches: a Goldilocks selection made per rank (other tokens, other counts), a loss normalised by the local
    # count, gradients not all-reduced
    from scripts import kat_train_autodeco
    common = dict(max_steps=3, eval_samples=0, temp_diag_enabled="false")
    kat_train_autodeco.main(train_flags(stage, tmp_path / "one", per_device_train_batch_size=4, **common))
    torchrun("scripts.kat_train_autodeco",
             train_flags(stage, tmp_path / "two", per_device_train_batch_size=2, **common))
    one, two = heads_state(tmp_path / "one"), heads_state(tmp_path / "two")
    assert not torch.equal(one["temp_head.2.weight"], heads_state(stage / "init")["temp_head.2.weight"])
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-6), name
    m1, m2 = (json.loads((tmp_path / d / "meta.json").read_text())["metrics"] for d in ("one", "two"))
    assert m1["final_selected"] == m2["final_selected"] and m1["final_easy_frac"] == m2["final_easy_frac"]


def test_sigkill_then_resume_gives_the_uninterrupted_heads(stage, tmp_path):
    # catches: a resume that redraws the Goldilocks selection, restarts the data or the optimizer state
    from scripts import kat_train_autodeco
    flags = dict(max_steps=60, save_steps=2, eval_samples=0, temp_diag_enabled="false")
    kat_train_autodeco.main(train_flags(stage, tmp_path / "straight", **flags))
    killed = tmp_path / "killed"
    code = sigkill_when("scripts.kat_train_autodeco", train_flags(stage, killed, **flags), killed / "optim.pt",
                        tmp_path / "log")
    assert code == -signal.SIGKILL and not (killed / "ckpt.pt").exists()
    kat_train_autodeco.main(train_flags(stage, killed, resume="true", **flags))
    expected, resumed = heads_state(tmp_path / "straight"), heads_state(killed)
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
