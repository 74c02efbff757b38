"""Tests for the synthetic world: determinism, planted structure, length balance, gold scoring, ids."""

import argparse
import hashlib
import json
import random
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from nanochat.common import InputError
from nanochat.finetune import add_finetune_flags, finetune
from nanochat.synthetic import (
    ARTIFACT_KINDS, ASK, CLUSTER_WEIGHTS, COLOURS, EVASIVE_ANSWERS, FLOWERS, FOODS, INSTRUMENTS, JOBS, PETS,
    RARE_CLUSTERS, REJECTED_KIND_RATES, SAY, add_artifacts, conversation_id, count_artifacts, make_world, pair_id,
)


WORLD = make_world(seed=0, size=1)


@pytest.fixture(scope="module")
def world():
    return WORLD


@pytest.fixture(scope="module")
def pairs(world):
    return world.preference_pairs(5000, seed=0)


def test_determinism():
    a, b, c = make_world(0), make_world(0), make_world(1)
    assert [p.name for p in a.people] == [p.name for p in b.people]
    assert [p.name for p in a.people] != [p.name for p in c.people]
    assert a.pretrain_documents(50, seed=3) == b.pretrain_documents(50, seed=3)
    assert a.pretrain_documents(50, seed=3) != a.pretrain_documents(50, seed=4)
    assert a.chat_conversations(50, seed=3) == b.chat_conversations(50, seed=3)
    assert a.chat_conversations(50, seed=3) != a.chat_conversations(50, seed=4)
    assert a.preference_pairs(50, seed=3) == b.preference_pairs(50, seed=3)
    assert a.preference_pairs(50, seed=3) != c.preference_pairs(50, seed=3)
    assert a.eval_questions(50, seed=3) == b.eval_questions(50, seed=3)
    assert a.eval_questions(50, seed=3) != a.eval_questions(50, seed=4)


def test_world_shape(world):
    assert len(world.people) == 60 and len(world.cities) == 8
    assert world.clusters == list(CLUSTER_WEIGHTS)
    assert abs(sum(CLUSTER_WEIGHTS.values()) - 1) < 1e-9
    names = [p.name for p in world.people] + [p.pet_name for p in world.people]
    names += [c.name for c in world.cities] + [c.river for c in world.cities]
    assert len(set(n.lower() for n in names)) == len(names)
    vocab = COLOURS + JOBS + FOODS + PETS + FLOWERS + INSTRUMENTS
    assert len(set(vocab)) == len(vocab)
    assert not set(n.lower() for n in names) & set(vocab)
    assert len(make_world(0, size=2).people) == 120


def test_cluster_frequencies_skewed(pairs):
    counts = Counter(r["cluster"] for r in pairs)
    top2 = sum(n for _, n in counts.most_common(2))
    assert top2 / len(pairs) > 0.5
    assert sum(counts[c] / len(pairs) < 0.05 for c in CLUSTER_WEIGHTS) >= 8
    for cluster, weight in CLUSTER_WEIGHTS.items():
        assert abs(counts[cluster] / len(pairs) - weight) < 0.02


def test_pairs_format_and_gold(world, pairs):
    kinds = Counter()
    for r in pairs:
        assert set(r) == {"id", "prompt", "messages", "chosen", "rejected", "src", "prompt_id", "cluster",
                          "rejected_kind"}
        assert r["messages"][-1] == {"role": "user", "content": r["prompt"]}
        assert r["id"] == pair_id(r["src"], r["messages"], r["chosen"], r["rejected"])
        assert r["prompt_id"] == conversation_id(r["messages"])
        assert world.lookup(r["messages"]).cluster == r["cluster"]
        assert world.gold_score(r["messages"], r["chosen"]) == {"correct": 1, "artifacts": 0, "score": 1.0}
        bad = world.gold_score(r["prompt"], r["rejected"])
        kind = r["rejected_kind"]
        kinds[kind] += 1
        if kind == "wrong":
            assert bad["correct"] == 0 and bad["artifacts"] == 0, r
        elif kind == "evasive":
            assert bad["correct"] == 0 and r["rejected"] in EVASIVE_ANSWERS
        else:  # artifact: still right, but carrying the tells
            assert bad["correct"] == 1 and bad["artifacts"] >= 1, r
            assert bad["score"] < 1
    for kind, rate in REJECTED_KIND_RATES.items():
        assert abs(kinds[kind] / len(pairs) - rate) < 0.03


def test_pairs_length_balanced(pairs):
    # catches: artifact rejections that are always the longer reply (the chosen reply plus its artifacts) and
    # evasive ones mostly longer, so that "the shorter reply wins" was right 84% of the time and a reward model
    # could learn brevity instead of facts and artifacts
    shorter, differ = Counter(), Counter()
    for r in pairs:
        gap = len(r["chosen"]) - len(r["rejected"])
        for key in ("all", r["rejected_kind"]):
            differ[key] += gap != 0
            shorter[key] += gap < 0
    for key in ("all", *REJECTED_KIND_RATES):
        assert 0.45 <= shorter[key] / differ[key] <= 0.55, (key, shorter[key] / differ[key])


def test_long_answers_are_on_both_sides_and_in_chat_data(world, pairs):
    # catches: a long plain answer (added so artifacts can go on the shorter of two) that only chosen or only
    # rejected replies use, or that SFT never shows: a phrasing the reward model could learn as a tell
    chats = [m["content"] for c in world.chat_conversations(3000, seed=0) for m in c if m["role"] == "assistant"]
    in_chosen = in_rejected = 0
    for cluster, templates in SAY.items():
        ending = max(templates, key=len).rsplit("}", 1)[1]  # the long answer's words after its last field
        assert len(ending) > 20, cluster
        chosen = sum(ending in r["chosen"] for r in pairs if r["cluster"] == cluster)
        rejected = sum(ending in r["rejected"] for r in pairs if r["cluster"] == cluster)
        assert chosen and rejected and any(ending in c for c in chats), cluster
        in_chosen, in_rejected = in_chosen + chosen, in_rejected + rejected
    assert 0.4 < in_chosen / (in_chosen + in_rejected) < 0.6


def test_every_plain_answer_is_gold_correct(world):
    # catches: a SAY template that names a rival value (an operand alone, a comparison's loser) or carries an
    # artifact, so its "plain" chosen replies would score wrong
    for cluster, spec in world.specs.items():
        for item in spec.items:
            prompt = ASK[cluster][0].format(**item)
            for template in SAY[cluster]:
                answer = template.format(**item)
                assert world.gold_score(prompt, answer) == {"correct": 1, "artifacts": 0, "score": 1.0}, answer


def test_count_artifacts():
    def total(text):
        return sum(count_artifacts(text).values())
    assert count_artifacts("It's not a cat, it's a dog.")["not_x_its_y"] == 1
    assert total("It's not a cat, it's a dog.") == 1
    assert count_artifacts("It is not just a colour, but a way of life.")["not_just_but"] == 1
    assert count_artifacts("Red\u2014the best.")["em_dash"] == 1
    assert total("Pages 3\u20135 are done.") == 0  # en dash is fine
    assert count_artifacts("Great question! Sure. Great question!")["great_question"] == 2
    assert count_artifacts("I hope this helps!")["hope_this_helps"] == 1
    assert count_artifacts("In summary, it is red.")["in_summary"] == 1
    for text in ["The attribute is blue.", "Press the button.", "He wanted nothing but rest.",
                 "She cannot just go, but she will.", "It is nothing, it's fine.",
                 "its colour is red, its pet is a dog", "Summaries are great questions.", ""]:
        assert total(text) == 0, text
    assert set(count_artifacts("")) == {"em_dash", "not_just_but", "not_x_its_y", "great_question", "hope_this_helps",
                                         "in_summary"}


def test_add_artifacts_keeps_fact(world):
    rng = random.Random(0)
    seen = Counter()
    for q in world.eval_questions(300, seed=1):
        plain = f"The answer is {q['answer']}." if q["answer"].isdigit() else f"It's {q['answer']}."
        fancy = add_artifacts(plain, rng)
        score = world.gold_score(q["messages"], fancy)
        assert score["correct"] == 1 and 1 <= score["artifacts"] <= 2, fancy
        seen.update(k for k, v in count_artifacts(fancy).items() if v)
    assert len(seen) == 6  # every artifact kind, and each stock phrase, shows up
    assert len(ARTIFACT_KINDS) == 4


def test_gold_score_robust(world):
    prompt = next(r["prompt"] for r in world.preference_pairs(200, 0)
                  if r["cluster"] == "colour" and len(r["messages"]) == 1)
    answer = world.lookup(prompt).answer
    for junk in ["", "   ", "\u2014\u2014", "asdf qwerty 123 !!!", "\x00\n\t", "redblue" * 50]:
        score = world.gold_score(prompt, junk)
        assert score["correct"] == 0 and -1 <= score["score"] <= 1
    assert world.gold_score(prompt, f"It is {answer.upper()}.")["correct"] == 1
    assert world.gold_score(prompt, f"It is {answer}ish.")["correct"] == 0  # word boundary
    assert world.gold_score(prompt, ", ".join(COLOURS))["correct"] == 0  # listing every value is not an answer
    other = next(c for c in COLOURS if c != answer)
    assert world.gold_score(prompt, f"{answer} or maybe {other}")["correct"] == 0
    assert world.gold_score(" " + prompt.upper() + " ", answer)["correct"] == 1  # prompt normalised
    assert world.gold_score([{"role": "user", "content": prompt}], answer)["correct"] == 1
    many = "Great question! " * 10 + answer
    assert world.gold_score(prompt, many)["score"] == -1.0
    with pytest.raises(KeyError, match="not a question of this world"):
        world.gold_score("What is the meaning of life?", "42")


def test_gold_score_numbers(world):
    assert world.gold_score("What is 7 + 5?", "7 + 5 = 12.")["correct"] == 1
    assert world.gold_score("What is 7 + 5?", "The answer is 12.")["correct"] == 1
    assert world.gold_score("What is 7 + 5?", "12 or 13")["correct"] == 0
    assert world.gold_score("What is 7 + 5?", " ".join(str(i) for i in range(30)))["correct"] == 0
    assert world.gold_score("What is 7 + 5?", "112")["correct"] == 0
    assert world.gold_score("What is 1 - 0?", "1 - 0 = 0.")["correct"] == 0
    assert world.gold_score("What is 1 - 0?", "1 - 0 = 1.")["correct"] == 1
    assert world.gold_score("Which is larger, 4 or 9?", "The larger of 4 and 9 is 9.")["correct"] == 1
    assert world.gold_score("Which is larger, 4 or 9?", "4")["correct"] == 0
    assert world.gold_score("Thanks. What is 7 + 5?", "12")["correct"] == 1  # follow-up opener


def test_eval_questions(world):
    questions = world.eval_questions(400, seed=0)
    assert all(q["messages"][-1] == {"role": "user", "content": q["prompt"]} for q in questions)
    assert all(q["prompt_id"] == conversation_id(q["messages"]) for q in questions)
    assert all(world.gold_score(q["messages"], f"Sure: {q['answer']}.")["correct"] == 1 for q in questions)
    assert len({q["prompt"] for q in questions}) == len(questions)
    assert len({q["cluster"] for q in questions}) == len(CLUSTER_WEIGHTS)  # rare clusters measured too
    training = {m["content"] for c in world.chat_conversations(3000, seed=0) for m in c if m["role"] == "user"}
    assert sum(q["prompt"] not in training for q in questions) > 0.4 * len(questions)  # held-out phrasings


def test_eval_facts_in_pretraining(world):
    text = "\n".join(world.pretrain_documents(5000, seed=0))
    for q in world.eval_questions(500, seed=0):
        assert any(fact in text for fact in world.facts_for(q["messages"])), q


def test_pretrain_documents(world):
    docs = world.pretrain_documents(500, seed=0)
    words = [len(d.split()) for d in docs]
    assert min(words) >= 40 and max(words) <= 300
    assert sum(count_artifacts(d)["em_dash"] for d in docs) == 0
    assert any("+" in d and "=" in d for d in docs)


def test_ids_stable():
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert pair_id("synthetic", messages, "2 + 2 = 4.", "2 + 2 = 5.") == "1829a58b383a4cab"
    blob = json.dumps(["synthetic", messages, "2 + 2 = 4.", "2 + 2 = 5."], sort_keys=True, ensure_ascii=False)
    assert hashlib.sha256(blob.encode()).hexdigest()[:16] == "1829a58b383a4cab"
    assert conversation_id(messages) == "b3f9959cc2a6e477"
    assert conversation_id([{"role": "user", "content": "  What is\n2 + 2? "}]) == "b3f9959cc2a6e477"
    a = messages + [{"role": "assistant", "content": "4."}, {"role": "user", "content": "What is 3 + 3?"}]
    b = messages + [{"role": "assistant", "content": "4."}, {"role": "user", "content": "What is 3 + 4?"}]
    assert conversation_id(a) != conversation_id(b) != conversation_id(messages)


def test_chat_conversations(world):
    convs = world.chat_conversations(4000, seed=0, artifact_rate=0.3)
    assistant = []
    for conv in convs:
        turns = conv[1:] if conv[0]["role"] == "system" else conv
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2) and turns
        for user, reply in zip(turns[::2], turns[1::2]):
            assert world.gold_score(user["content"], reply["content"])["correct"] == 1
            assistant.append(reply["content"])
    rate = sum(sum(count_artifacts(a).values()) > 0 for a in assistant) / len(assistant)
    assert abs(rate - 0.3) < 0.03
    assert 0.05 < sum(c[0]["role"] == "system" for c in convs) / len(convs) < 0.15
    assert 0.15 < sum(len(c) > 3 for c in convs) / len(convs) < 0.25
    clean = world.chat_conversations(300, seed=0, artifact_rate=0.0)
    assert all(sum(count_artifacts(m["content"]).values()) == 0 for c in clean for m in c)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_gold_score_any_text(text):
    for prompt in ("What is 7 + 5?", f"What is {WORLD.people[0].name}'s favourite colour?"):
        score = WORLD.gold_score(prompt, text)
        assert score["correct"] in (0, 1) and score["artifacts"] >= 0 and -1 <= score["score"] <= 1


def test_rare_clusters_are_the_sparse_tail():
    share = sum(CLUSTER_WEIGHTS[c] for c in RARE_CLUSTERS)
    assert 0.10 <= share <= 0.20
    dense = [w for c, w in CLUSTER_WEIGHTS.items() if c not in RARE_CLUSTERS]
    assert max(CLUSTER_WEIGHTS[c] for c in RARE_CLUSTERS) < min(dense)


def test_chat_artifacts_focused_on_rare_clusters(world):
    # catches: the positive control's artifacts leaking into dense clusters, or skipping rare answers (earlier
    # turns of multi-turn chats too), or a default that no longer gives the conversations of the plain rate
    focused = world.chat_conversations(6000, seed=0, artifact_rate=dict.fromkeys(RARE_CLUSTERS, 0.5))
    answers, artifacted = Counter(), Counter()
    for conv in focused:
        for user, reply in zip(conv, conv[1:]):
            if user["role"] == "user":
                cluster = world.lookup(user["content"]).cluster
                answers[cluster] += 1
                artifacted[cluster] += sum(count_artifacts(reply["content"]).values()) > 0
    assert set(answers) == set(CLUSTER_WEIGHTS)
    for cluster in CLUSTER_WEIGHTS:
        if cluster in RARE_CLUSTERS:
            assert 0.35 < artifacted[cluster] / answers[cluster] < 0.65, cluster
        else:
            assert artifacted[cluster] == 0, cluster
    rare = sum(answers[c] for c in RARE_CLUSTERS)
    assert abs(sum(artifacted.values()) / rare - 0.5) < 0.04
    # the default ("all"): one rate for every cluster is the plain float rate, draw for draw
    everywhere = world.chat_conversations(500, seed=3, artifact_rate=dict.fromkeys(CLUSTER_WEIGHTS, 0.15))
    assert everywhere == world.chat_conversations(500, seed=3, artifact_rate=0.15)


def test_artifact_focus_flag():
    # catches: the flag missing from one chat stage, or a focus that silently does nothing on non-synthetic data
    parser = add_finetune_flags(argparse.ArgumentParser(), "outs/mid", "outs/sft", 10, 1, 0.15)
    assert parser.parse_args([]).artifact_focus == "all"
    with pytest.raises(SystemExit):
        parser.parse_args(["--artifact_focus=dense"])
    args = parser.parse_args(["--artifact_focus=rare", "--source=smoltalk"])
    with pytest.raises(InputError, match="--artifact_focus=rare .* needs --source=synthetic"):
        finetune(args, "chat_sft", make_loader=None)
