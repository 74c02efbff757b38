"""
Tests for AutoDeco's evaluation: the world's free-clause answers (nanochat/synthetic.py), the statistics and the
teacher-forced filter of scripts/kat_eval_autodeco.py, the script end to end on a tiny base model with tiny heads,
and --autodeco_path in scripts/chat_cli.py and scripts/chat_eval.py. Each test names, in a comment, the bug it
catches.
"""

import hashlib
import json
import math
import random
import re
from collections import Counter

import pytest
import torch

from conftest import make_tiny_model
from nanochat.autodeco import (AUTODECO_KIND, AutoDecoHeads, HeadsConfig, base_reference, decode_hook,
                               load_autodeco, weights_fingerprint)
from nanochat.checkpoint import load_model, load_payload, save_checkpoint, tokenizer_dir
from nanochat.common import InputError
from nanochat.engine import Engine
from nanochat.evaluate import generate_responses
from nanochat.synthetic import (ASK, CLUSTER_WEIGHTS, FREE_CLAUSES, RARE_CLUSTERS, SAY, add_free_clause,
                                free_clause_span, make_world)
from scripts import chat_cli, chat_eval, kat_eval_autodeco
from scripts.kat_eval_autodeco import (frontier_height, kept_set, majority_correct, pass_at_k, teacher_forced,
                                       token_classes)


def digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# -----------------------------------------------------------------------------
# the world's free clauses

def test_default_world_outputs_are_unchanged(world):
    # catches: the free-clause option drawing from the conversations' random stream even when off, which would
    # silently change the density experiment's data. The digests were taken from synthetic.py before free clauses
    # existed.
    assert digest(world.chat_conversations(300, seed=1)) == "b28dcd6acdbe1fcd"
    assert digest(world.chat_conversations(300, seed=1, free_clause_rate=0.0)) == "b28dcd6acdbe1fcd"
    assert digest(world.chat_conversations(300, seed=1, artifact_rate=dict.fromkeys(RARE_CLUSTERS, 0.5))) \
        == "b2d078929c5ab442"
    assert digest(world.preference_pairs(200, seed=1)) == "ff69f8a1503a6731"
    assert digest(world.pretrain_documents(100, seed=1)) == "7f0454c06436edc8"
    assert digest(world.eval_questions(100, seed=1)) == "4598faf2eacbe9b5"


def test_free_clauses_only_add_a_clause_at_their_rate(world):
    # catches: clauses placed anywhere but before the final punctuation, replacing the answer, or shifting the
    # conversation stream (then removing the clauses would not give back the default conversations), and a rate
    # that is not the share of answers given one
    plain = world.chat_conversations(2000, seed=2)
    free = world.chat_conversations(2000, seed=2, free_clause_rate=0.3)
    clause = re.compile(", (?:" + "|".join(map(re.escape, FREE_CLAUSES)) + ")(?=[.!?\u2014 ])")
    used, total = Counter(), 0
    for a, b in zip(plain, free):
        assert [{**m, "content": clause.sub("", m["content"])} for m in b] == a
        for m in b:
            if m["role"] == "assistant":
                total += 1
                span = free_clause_span(m["content"])
                used[m["content"][span[0]:span[1]] if span else None] += 1
    assert abs(1 - used[None] / total - 0.3) < 4 * math.sqrt(0.3 * 0.7 / total)
    assert set(used) - {None} == set(FREE_CLAUSES)  # drawn from all of them


def test_free_clauses_leave_gold_scoring_to_the_fact():
    # catches: a clause holding a digit, a vocabulary word, an invented name or an artifact, which gold_score would
    # read as a rival value (then a right answer scores wrong) or charge as an artifact
    for seed, size in ((0, 1), (1, 1), (2, 2)):
        world = make_world(seed=seed, size=size)
        names = {p.name.lower() for p in world.people} | {p.pet_name.lower() for p in world.people}
        names |= {c.name.lower() for c in world.cities} | {c.river.lower() for c in world.cities}
        names |= {r.lower() for r in world.regions}
        words = {w for clause in FREE_CLAUSES for w in re.findall(r"[a-z]+", clause.lower())}
        values = {v.lower() for spec in world.specs.values() for v in spec.candidates}
        assert not words & (names | values) and not re.search(r"\d", " ".join(FREE_CLAUSES))
    world = make_world(seed=0)
    for cluster in CLUSTER_WEIGHTS:
        item = world.specs[cluster].items[3]
        for template in SAY[cluster]:
            for clause in FREE_CLAUSES:
                answer = add_free_clause(template.format(**item), clause)
                assert world.gold_score(ASK[cluster][0].format(**item), answer) == {"correct": 1, "artifacts": 0,
                                                                                    "score": 1.0}, answer


def test_answer_spans_and_token_classes_by_hand(world, tok):
    # catches: the value span taken at an echoed operand ("5 + 0 = 5": the first 5), a free span that misses or
    # overruns the clause, token classes shifted by one token or by the leading space of a token, and a vote for a
    # response that names several values
    answer = "5 + 0 = 5, as it happens."
    assert world.answer_spans("What is 5 + 0?", answer) == {"value": (8, 9), "free": (11, 24)}
    text = "Radan's favourite colour is grey, which is good to know."  # world 0: Radan likes grey
    spans = world.answer_spans("What is Radan's favourite colour?", text)
    assert spans == {"value": (28, 32), "free": (34, 55)}
    assert world.answer_spans("What is Radan's favourite colour?", "Radan likes grey.") == {"value": (12, 16),
                                                                                           "free": None}
    # maj@k's votes: the one value named, None for none or several
    assert world.named_value("What is 5 + 0?", answer) == "5" and world.named_value("What is 5 + 0?", "5 or 6") is None
    assert world.named_value("What is Radan's favourite colour?", "Grey, as I recall.") == "grey"
    assert world.named_value("What is Radan's favourite colour?", "No idea.") is None
    ids = tok.encode(text) + [tok.encode_special("<|assistant_end|>")]
    classes = token_classes(tok.token_bytes(), ids, text, spans)
    joined = {c: "".join(tok.decode([t]) for t, k in zip(ids, classes) if k.startswith(c)) for c in ("value", "free")}
    assert joined == {"value": "grey", "free": "which is good to know"}
    assert classes[-1] == "other" and classes[-2] == "other"  # the end token and the final "."
    assert classes.count("free_start") == 1 and tok.decode([ids[classes.index("free_start")]]).strip() == "w"
    assert classes.index("free_start") > len(classes) - 1 - classes[::-1].index("value")  # value before the clause


# -----------------------------------------------------------------------------
# statistics

def test_pass_at_k_and_maj_at_k_by_hand():
    # catches: pass@k as the plain share of right samples (0.4 at every k), as 1 - (1 - c/n)^k (0.64 at k=2,
    # sampling with replacement), an off-by-one in the binomials; maj@k counting non-votes or breaking ties by order
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # 1 - C(3,1)/C(5,1) = 1 - 3/5
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 5) == 1.0  # n - c = 3 < 5: every 5-subset holds a right one
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    assert majority_correct(["12", None, None, "13", "12"], "12") == 1.0
    assert majority_correct(["13", "12"], "12") == 0.5  # a tie: half the tied values are right
    assert majority_correct(["13", "13", "12", None, None, None], "12") == 0.0  # non-votes are no majority
    assert majority_correct([None, None], "12") == 0.0


def test_frontier_height_by_hand():
    # catches: interpolating in the wrong direction, extrapolating beyond the curve, and taking the first crossing
    # (not the highest) where the curve doubles back
    assert frontier_height([0.1, 0.3, 0.6], [0.5, 0.4, 0.2], 0.2) == pytest.approx(0.45)
    assert frontier_height([0.1, 0.3, 0.6], [0.5, 0.4, 0.2], 0.45) == pytest.approx(0.3)
    assert math.isnan(frontier_height([0.1, 0.3, 0.6], [0.5, 0.4, 0.2], 0.05))
    assert frontier_height([0.1, 0.5, 0.3], [0.5, 0.3, 0.45], 0.4) == pytest.approx(0.375)  # not 0.35


def test_kept_set_matches_the_definitions():
    # catches: min-p measured against the untempered top probability, top-p dropping the token whose mass reaches
    # it, and greedy rows keeping a near-tie of the argmax (T = 0 as a tiny temperature)
    torch.manual_seed(0)
    logits = torch.randn(6, 12) * 2
    logits[0, 3] = logits[0].max() - 1e-6  # a near-tie for the greedy row
    temperature = torch.tensor([0.0, 0.5, 1.0, 1.5, 0.7, 2.0])
    top_p = torch.tensor([0.5, 0.9, 0.6, 0.3, 1.0, 0.8])
    for p in (None, top_p):
        kept = kept_set(logits, temperature, 0.1, p)
        for row in range(6):
            if temperature[row] == 0:
                expected = {int(logits[row].argmax())}
            else:
                probs = torch.softmax(logits[row] / temperature[row], -1).tolist()
                survivors = [j for j in range(12) if probs[j] >= 0.1 * max(probs)]
                expected, mass = set(), 0.0
                total = sum(probs[j] for j in survivors)
                for j in sorted(survivors, key=lambda j: -probs[j]):
                    if p is not None and mass >= float(p[row]):
                        break
                    expected.add(j)
                    mass += probs[j] / total
            assert set(kept[row].nonzero().flatten().tolist()) == expected, (row, p)


# -----------------------------------------------------------------------------
# the script on a tiny base model with tiny heads

def save_heads(root, name, base_dir, temperature_std, use_top_p=False):
    """
    AutoDeco heads on the base at base_dir: the temperature head's last layer random with this std around
    T = 0.5 (std 0: T = 1 exactly, the untrained heads).
    """
    payload = load_payload(base_dir)
    torch.manual_seed(1)
    heads = AutoDecoHeads(HeadsConfig(n_embd=payload["config"]["n_embd"]))
    with torch.no_grad():
        heads.temp_head[2].weight.normal_(0, temperature_std)
        heads.temp_head[2].bias.fill_(math.log(1 / 3) if temperature_std else 0.0)  # 2 sigmoid(ln 1/3) = 0.5
        heads.top_p_head[2].weight.normal_(0, 0.05)
    out = root / "outs" / name
    extra = base_reference(payload["path"], weights_fingerprint(payload["model"]), out)
    extra |= {"min_p_ratio": 0.1, "train_temp": True, "train_top_p": use_top_p}
    save_checkpoint(out, heads, 1, tokenizer_dir(payload), kind=AUTODECO_KIND, extra=extra, parents=[payload],
                    world=payload["world"])
    return out


@pytest.fixture(scope="module")
def autodeco_run(tmp_path_factory, world, tok):
    """outs/sft (a tiny random GPT that sometimes ends its answers) and heads on it: random T, constant T = 1."""
    root = tmp_path_factory.mktemp("autodeco")
    tok.save(root / "tokenizer")
    base = make_tiny_model(vocab_size=tok.vocab_size, sequence_len=128)
    with torch.no_grad():  # make <|assistant_end|> the third greedy token of a question, so lengths vary
        prompt = tok.render_for_completion([{"role": "user", "content": "What is 2 + 3?"}])
        third = Engine(base).generate([prompt], max_new_tokens=3, temperature=0.0).tokens[0, 2].item()
        base.lm_head.weight[tok.encode_special("<|assistant_end|>")] = 1.01 * base.lm_head.weight[third]
    save_checkpoint(root / "outs" / "sft", base, 0, str(root / "tokenizer"), world={"seed": 0, "size": 1})
    save_heads(root, "autodeco", root / "outs" / "sft", 0.05, use_top_p=True)
    save_heads(root, "autodeco_t1", root / "outs" / "sft", 0.0)
    return root


def eval_flags(root, heads, out, *extra):
    return [f"--autodeco_path={root / 'outs' / heads}", f"--out_dir={root / 'outs' / out}", "--num_prompts=6",
            "--num_samples=3", "--max_new_tokens=8", "--temperatures=0.5,1.0", "--num_resamples=50", "--device=cpu",
            *extra]


@pytest.fixture(scope="module")
def evaluated(autodeco_run):
    """The script's JSON on the random-temperature heads."""
    kat_eval_autodeco.main(eval_flags(autodeco_run, "autodeco", "autodeco_eval"))
    return json.loads((autodeco_run / "outs" / "autodeco_eval" / "autodeco_eval.json").read_text())


def test_eval_script_end_to_end(autodeco_run, evaluated):
    # catches: MeanShift's temperature taken as a mean of per-sample means, without the stop tokens, or from other
    # samples than AutoDeco's (lengths vary here, so those differ); a report, chart or stage section not written;
    # greedy samples that differ within a prompt; a CI that does not hold its estimate
    out = autodeco_run / "outs" / "autodeco_eval"
    for name in ("autodeco_eval.md", "autodeco_eval.json", "autodeco_eval.png", "report.md"):
        assert (out / name).stat().st_size > 0
    assert (out / "autodeco_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## autodeco_eval" in (autodeco_run / "outs" / "report.md").read_text()
    temps = [t for prompt in evaluated["autodeco_temperatures"] for sample in prompt for t in sample]
    lengths = [len(sample) for prompt in evaluated["autodeco_temperatures"] for sample in prompt]
    assert len(set(lengths)) > 1 and len(temps) == sum(lengths)
    assert evaluated["meanshift_temperature"] == pytest.approx(sum(temps) / len(temps), rel=1e-9)
    assert 0.01 <= min(temps) < max(temps) < 2  # the heads do move the temperature
    assert all(len(set(samples)) == 1 for samples in evaluated["samples"]["greedy"])
    methods = set(evaluated["summary"])
    assert methods == {"greedy", "t0.5", "t1", "meanshift", "autodeco"}
    for m in methods:
        for key in ("correct", "distinct_2", "pass_at_k", "maj_at_k", "survived_all", "kept_all"):
            point, lo, hi = evaluated["summary"][m][key]
            assert lo <= point + 1e-9 and point <= hi + 1e-9
        assert evaluated["summary"][m]["pass_at_k"][0] >= evaluated["summary"][m]["correct"][0]
    assert evaluated["summary"]["greedy"]["kept_all"][0] == 1.0


def test_heads_and_meanshift_sample_like_the_fixed_temperature_they_stand_for(autodeco_run, evaluated):
    # catches: the decode hook's path and the fixed-temperature path drawing different random numbers (then the
    # methods are not compared on common random numbers), and MeanShift sampled at another temperature than its own
    kat_eval_autodeco.main(eval_flags(autodeco_run, "autodeco_t1", "autodeco_t1_eval"))
    constant = json.loads((autodeco_run / "outs" / "autodeco_t1_eval" / "autodeco_eval.json").read_text())
    assert constant["meanshift_temperature"] == 1.0
    assert constant["samples"]["autodeco"] == constant["samples"]["t1"] == constant["samples"]["meanshift"]
    assert constant["summary"]["autodeco"]["survived_all"] == constant["summary"]["t1"]["survived_all"]
    assert constant["frontier_gap_correct"][0] == pytest.approx(0.0, abs=1e-12)
    t = evaluated["meanshift_temperature"]
    kat_eval_autodeco.main(eval_flags(autodeco_run, "autodeco", "autodeco_mean_eval", f"--temperatures={t!r}"))
    again = json.loads((autodeco_run / "outs" / "autodeco_mean_eval" / "autodeco_eval.json").read_text())
    assert again["samples"]["meanshift"] == again["samples"][f"t{t:g}"] == evaluated["samples"]["meanshift"]


def test_teacher_forced_survival_reads_the_previous_position(autodeco_run, world, tok):
    # catches: an off-by-one between a reference token and the logits that predict it (the hidden state at its own
    # position instead of the one before), checked against a plain full forward
    model, _ = load_model(autodeco_run / "outs" / "sft")
    items = world.eval_questions(3, seed=5)
    references = [world.free_clause_answer(item["messages"], random.Random(i)) for i, item in enumerate(items)]
    hook = lambda h, logits: (torch.full((h.size(0),), 0.8), None)  # noqa: E731
    forced = teacher_forced(model, tok, world, items, references, hook, {"t0.8": 0.8}, 0.1, batch_size=2)
    for i, (item, ref) in enumerate(zip(items, references)):
        prompt = tok.render_for_completion(item["messages"])
        ids, _ = tok.render_conversation(item["messages"] + [{"role": "assistant", "content": ref}])
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0]
        before = logits[len(prompt) - 1:len(ids) - 1]  # the logits that predict each reply token
        target = torch.tensor(ids[len(prompt):])
        assert forced["survived"]["greedy"][i] == (before.argmax(-1) == target).tolist()
        # min-p 0.1 at T keeps the tokens within T ln 10 of the top logit (give or take rounding at the edge)
        edge = before.max(-1, keepdim=True).values - 0.8 * math.log(10)
        surely, maybe = (before >= edge + 1e-4).sum(-1), (before >= edge - 1e-4).sum(-1)
        kept = torch.tensor(forced["kept"]["t0.8"][i])
        assert ((surely <= kept) & (kept <= maybe)).all() and len(kept) == len(target)
        assert forced["survived"]["autodeco"][i] == forced["survived"]["t0.8"][i]
        assert len(forced["classes"][i]) == len(ids) - len(prompt) and "free_start" in forced["classes"][i]


def test_eval_script_refuses_bad_flags(autodeco_run, capsys):
    # catches: a temperature grid that accepts 0 or garbage, one sample per prompt (no diversity to measure), and a
    # missing heads directory reported as anything but a user error naming it (run_script prints those in one line)
    for bad in ("--temperatures=0,1", "--temperatures=a"):
        with pytest.raises(SystemExit):
            kat_eval_autodeco.main(eval_flags(autodeco_run, "autodeco", "bad", bad))
        assert "--temperatures" in capsys.readouterr().err
    with pytest.raises(InputError, match="--num_samples"):
        kat_eval_autodeco.main(eval_flags(autodeco_run, "autodeco", "bad", "--num_samples=1"))
    with pytest.raises(InputError, match="nope"):
        kat_eval_autodeco.main(eval_flags(autodeco_run, "nope", "bad"))


# -----------------------------------------------------------------------------
# chat_cli and chat_eval

def test_chat_cli_and_chat_eval_sample_with_the_heads(autodeco_run, world, monkeypatch, capsys):
    # catches: --autodeco_path ignored (fixed settings used, or the heads loaded but not given to the sampler, or
    # their top-p or min-p left out), and flags the heads would silently override accepted instead of refused
    monkeypatch.chdir(autodeco_run)
    model, heads, payload = load_autodeco("outs/autodeco")
    tok = chat_cli.load_tokenizer(payload)
    questions = [q["messages"] for q in world.eval_questions(4, seed=0)]
    sampling = {"seed": 3, "min_p": 0.1, "decode_hook": decode_hook(heads, use_top_p=True)}
    expected = generate_responses(model, tok, questions[:1], 8, **sampling)
    chat_cli.main(["--autodeco_path=outs/autodeco", f"--prompt={questions[0][0]['content']}", "--max_new_tokens=8",
                   "--device=cpu", "--seed=3"])
    assert capsys.readouterr().out == chat_cli.escape(expected[0]) + "\n"
    expected = generate_responses(model, tok, questions, 8, num_samples=2, **sampling)
    chat_eval.main(["--autodeco_path=outs/autodeco", "--limit=4", "--max_new_tokens=8", "--num_samples=2",
                    "--seed=3", "--device=cpu"])
    results = json.loads((autodeco_run / "outs" / "eval_autodeco" / "results.json").read_text())
    assert [r["response"] for r in results["tasks"]["world"]["records"]] == expected
    capsys.readouterr()
    for script, conflict in ((chat_cli, "--temperature=0.5"), (chat_eval, "--min_p=0.2"),
                             (chat_eval, "--ckpt_path=outs/sft")):
        with pytest.raises(SystemExit, match="--autodeco_path brings its own"):
            script.main(["--autodeco_path=outs/autodeco", conflict, "--prompt=hi", "--device=cpu"]
                        if script is chat_cli else ["--autodeco_path=outs/autodeco", conflict, "--device=cpu"])
