"""
Tests for the synthetic world's multiple-choice questions (World.mc_items, synthetic.translate) and their mcqa
side (world_en / world_l2 loaders, the l2 answer label and preamble, reference answers and conversations). Each
test says in a comment which plausible bug it catches. Everything is made in memory; nothing touches the network.
"""

import hashlib
import json
import re

import pytest

from nanochat import mcqa
from nanochat.synthetic import (
    ASK, L2_LEXICON, MC_SINGLE_HOP, MC_TWO_HOP, ONSETS, VOWELS, _reserved_words, make_world, translate,
)

WORLDS = [make_world(42, 1), make_world(0, 2)]
NAME_SHAPE = re.compile(rf"(?:[{''.join(ONSETS)}][{''.join(VOWELS)}]){{2,3}}(?:[nlr]|ria)?")


def could_be_name(word):
    """Whether _invent_names could make this (lowercase) word: syllables, an optional coda, no final e."""
    return bool(NAME_SHAPE.fullmatch(word)) and not word.endswith("e")


def digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def key(item):
    """(kind, index) of an item, from its id "world_<language>/<seed>-<size>/<kind>/<index>"."""
    _, _, kind, i = item["id"].split("/")
    return kind, int(i)


def expected(world, kind, i):
    """(gold value, the intermediate subject or None, the candidates of the answered attribute), straight from the
    world's people and cities rather than from the clusters that mc_items uses."""
    by_name = {c.name: c for c in world.cities}
    if kind == "river_of_home":
        person = world.people[i]
        return by_name[person.city].river, person.city, [c.river for c in world.cities]
    if kind in MC_TWO_HOP:
        person, attr = world.people[i], kind.removeprefix("owner_")
        attr = "city" if attr == "home_city" else attr
        return str(getattr(person, attr)), person.name, world.specs[MC_TWO_HOP[kind][2]].candidates
    item = world.specs[kind].items[i]
    return item["value"], None, world.specs[kind].candidates


@pytest.mark.parametrize("world", WORLDS, ids=["42-1", "0-2"])
def test_choices_distinct_from_the_attribute_and_the_letter_points_at_the_gold_value(world):
    # catches: a distractor equal to the answer or to another distractor (gold not excluded, sampled with
    # replacement), distractors from another attribute (a river question offering cities), a letter off by one or
    # taken before the shuffle, and a two-hop answer about the wrong city or person (the person index used as a
    # city index)
    items = world.mc_items("en")
    # one per person and kind, but one per city for rivers
    assert len({item["id"] for item in items}) == len(items) == \
        60 * world.size * (len(MC_SINGLE_HOP) - 1 + len(MC_TWO_HOP)) + 8 * world.size
    assert {item["subject"] for item in items} == set(MC_SINGLE_HOP) | set(MC_TWO_HOP)
    for item in items:
        gold, _, candidates = expected(world, *key(item))
        assert len(set(item["choices"])) == 4
        assert item["choices"][mcqa.LETTERS.index(item["answer"])] == gold
        wrong = [c for c in item["choices"] if c != gold]
        if candidates:
            assert set(wrong) <= set(candidates)
        else:  # ages: near misses
            assert all(0 < abs(int(c) - int(gold)) <= 3 for c in wrong)
    # the gold letter is spread over A-D, not stuck where it was put before the shuffle
    assert {item["answer"] for item in items} == set(mcqa.LETTERS)


@pytest.mark.parametrize("world", WORLDS, ids=["42-1", "0-2"])
def test_rationale_states_the_facts_and_agrees_with_the_gold_scorer(world):
    # catches: a two-hop rationale that skips the intermediate fact (only "Dover's favourite colour is red."), one
    # whose facts are about another subject than the answer, and a reference answer whose letter is not the item's
    for language in ("en", "l2"):
        for item in world.mc_items(language):
            kind, i = key(item)
            facts, letter = world.mc_reference(item)
            assert letter == item["answer"]
            assert mcqa.score(item, mcqa.reference_response(world, item)) == 1.0
            assert mcqa.score(item, mcqa.reference_response(world, item, rationale=False)) == 1.0
            if language == "l2" or kind not in MC_TWO_HOP:
                continue
            gold, via, _ = expected(world, kind, i)
            first, last = facts.split(". ")
            assert via in first and via in last and gold in last
            # the last fact answers the single-hop question about the intermediate subject, by the world's own scorer
            cluster = MC_TWO_HOP[kind][2]
            assert world.gold_score(ASK[cluster][0].format(name=via, city=via), last)["correct"] == 1


def test_l2_lexicon_is_a_stable_bijection_that_never_makes_a_name():
    # catches: two English words sharing an l2 word (the language could not be read back), an l2 word that is an
    # English word or shaped like an invented name (a name would then be translated, or an l2 word read as a name),
    # and a lexicon that drifts between runs or versions (unseeded draws, set order): trained models read it
    values = list(L2_LEXICON.values())
    assert len(set(values)) == len(values)
    assert not set(values) & set(L2_LEXICON)
    assert not any(could_be_name(v) for v in values)
    # the world's names avoid _reserved_words; a lexicon word outside it must not be able to be a name
    assert all(w in _reserved_words() for w in L2_LEXICON if could_be_name(w))
    # regenerate: digest(L2_LEXICON) -- a change here re-labels every l2 text a model was trained on
    assert digest(L2_LEXICON) == "c06e1845113702b4"
    assert {w: L2_LEXICON[w] for w in ("answer", "red", "river", "the", "owner", "colour")} == {
        "answer": "thetul", "red": "hel", "river": "shafa", "the": "jir", "owner": "shibon", "colour": "halil"}


@pytest.mark.parametrize("world", WORLDS, ids=["42-1", "0-2"])
def test_l2_items_are_their_english_twins_word_for_word(world):
    # catches: a translation that drops or moves punctuation, changes a name or a number, leaves a capitalised
    # template word ("What") in English, or translates choices differently from the question's text
    inverse = {v: k for k, v in L2_LEXICON.items()}

    def back(text):
        def word(match):
            w = match.group()
            if w.lower() not in inverse:
                return w
            return inverse[w.lower()].capitalize() if w[0].isupper() else inverse[w.lower()]
        return re.sub(r"[A-Za-z]+", word, text)

    names = {p.name for p in world.people} | {p.pet_name for p in world.people} | \
        {c.name for c in world.cities} | {c.river for c in world.cities}
    for en, l2 in zip(world.mc_items("en"), world.mc_items("l2")):
        assert key(en) == key(l2) and en["answer"] == l2["answer"] and l2["language"] == "l2"
        for a, b in [(en["question"], l2["question"]), (world.mc_reference(en)[0], world.mc_reference(l2)[0]),
                     *zip(en["choices"], l2["choices"])]:
            assert back(b) == a
            assert re.sub(r"[A-Za-z]+", "w", a) == re.sub(r"[A-Za-z]+", "w", b)  # punctuation, digits, spacing
            kept = [w for w in re.findall(r"[A-Za-z]+", a) if w in names or len(w) == 1 and w.isupper()]
            assert kept == [w for w in re.findall(r"[A-Za-z]+", b) if w in kept]
            assert not {w.lower() for w in re.findall(r"[A-Za-z]+", b) if w not in names} & set(L2_LEXICON)
    assert translate("Tell me 7 things.", "en") == "Tell me 7 things."
    with pytest.raises(ValueError, match="no l2 word"):
        translate("the zyxt", "l2")  # a template word missing from the lexicon must not pass through as English


def test_l2_answer_label_and_preamble():
    # catches: an empty l2 label (l2 answers unreadable: extract_answer would need the English label), a preamble
    # whose format line names another label than the one extract_answer reads, and l2 ousting the English label
    label = mcqa.ANSWER_LABELS["l2"][0]
    assert label == translate("Answer", "l2") != "Answer"
    assert f'"{label}: X"' in mcqa.PREAMBLES["l2"] and "A, B, C" in mcqa.PREAMBLES["l2"]
    assert mcqa.extract_answer(f"Jir shafa.\n{label}: C", "l2") == "C"
    assert mcqa.extract_answer(f"{label.upper()} - b", "l2") == "B"
    assert mcqa.extract_answer("Answer: D", "l2") == "D"  # a model falling back to English still scores
    assert mcqa.extract_answer(f"{label}: C", "en") is None
    world = WORLDS[0]
    item = world.mc_items("l2")[0]
    assert mcqa.render_question(item).startswith(mcqa.PREAMBLES["l2"])
    assert mcqa.reference_response(world, item).endswith(f"\n{label}: {item['answer']}")


def test_loaders_give_disjoint_stable_parts_aligned_across_languages():
    # catches: overlapping parts (a test question also trained on), parts that lose items, a cut that depends on
    # the language (an l2 test question whose English twin is in train), a limit applied before the cut, ids or
    # parts that change between calls, and world_seed not reaching the world
    for name in ("world_en", "world_l2"):
        parts = {split: mcqa.load_mcqa(name, split) for split in mcqa.WORLD_SHARES}
        ids = [item["id"] for part in parts.values() for item in part]
        assert len(ids) == len(set(ids)) == len(WORLDS[0].mc_items())
        assert 0.7 < len(parts["train"]) / len(ids) < 0.9 and len(parts["test"]) > 50
        assert parts == {split: mcqa.load_mcqa(name, split) for split in mcqa.WORLD_SHARES}
        assert mcqa.load_mcqa(name, "test", limit=5) == parts["test"][:5]
        assert mcqa.load_mcqa(name, "test", seed=1) != parts["test"]
    for split in mcqa.WORLD_SHARES:
        en, l2 = mcqa.load_mcqa("world_en", split), mcqa.load_mcqa("world_l2", split)
        assert [key(item) for item in en] == [key(item) for item in l2]
    other = mcqa.load_world("en", "test", world_seed=0, world_size=2)
    assert other[0]["id"].startswith("world_en/0-2/")
    assert other == mcqa.load_world("en", "test", world_seed=0, world_size=2)
    with pytest.raises(ValueError, match="not 'val'"):
        mcqa.load_mcqa("world_en", "val")
    with pytest.raises(ValueError, match="not about this world"):
        WORLDS[1].mc_reference(WORLDS[0].mc_items()[0])


def test_world_conversations():
    # catches: conversations drawn from other items than those passed (held-out questions leaking into SFT), a user
    # turn that is not the rendered question, and an unseeded draw
    world = WORLDS[0]
    train = mcqa.load_mcqa("world_l2", "train")
    rendered = {mcqa.render_question(item): item for item in train}
    conversations = mcqa.world_conversations(world, train, 50, seed=0)
    assert conversations == mcqa.world_conversations(world, train, 50, seed=0)
    assert conversations != mcqa.world_conversations(world, train, 50, seed=1)
    for user, assistant in conversations:
        item = rendered[user["content"]]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert assistant["content"] == mcqa.reference_response(world, item)
    bare = mcqa.world_conversations(world, train, 5, seed=0, rationale=False)
    assert all(m[1]["content"].startswith(mcqa.ANSWER_LABELS["l2"][0] + ": ") for m in bare)


# Digests of default outputs, computed with nanochat/synthetic.py before the multiple-choice code was added; the
# world's generators must stay byte-identical (data, checkpoints and results of earlier runs depend on them). To
# regenerate after a deliberate change, print {name: digest(output)} with the expressions below.
DEFAULT_DIGESTS = {
    (42, 1): {"world": "3776c82a3473f13b", "pretrain": "1f6eb044ebeefbf6", "chat": "6c0468f4f24d26df",
              "chat_free": "77611160e5de3f46", "pairs": "86468fe407e7b14d", "eval": "d02ebfaa0da190c0",
              "gold": "ba3502d62ca90110"},
    (0, 2): {"world": "30735e5fe412316d", "pretrain": "f2e2461496d9449c", "chat": "de3234c713107bac",
             "chat_free": "0cd842e1baa15f59", "pairs": "1b3eccee99823c20", "eval": "f4b2d6c69717878b",
             "gold": "235786278e2dc82b"},
}


@pytest.mark.parametrize("seed,size", list(DEFAULT_DIGESTS))
def test_default_outputs_unchanged(seed, size):
    # catches: a template table the generators share edited for the new questions (a new ASK line changes which
    # prompts chat data draws), a new name-shaped word in _reserved_words (names would change), and a draw the
    # multiple-choice code takes from a stream the existing generators use
    w = make_world(seed=seed, size=size)
    questions = w.eval_questions(30, seed=3)
    got = {
        "world": digest([[vars(p) for p in w.people], [vars(c) for c in w.cities], w.regions]),
        "pretrain": digest(w.pretrain_documents(30, seed=0)),
        "chat": digest(w.chat_conversations(30, seed=1)),
        "chat_free": digest(w.chat_conversations(30, seed=1, artifact_rate={"river": 1.0}, free_clause_rate=0.3)),
        "pairs": digest(w.preference_pairs(30, seed=2)),
        "eval": digest(questions),
        "gold": digest([w.gold_score(q["messages"], r) for q in questions
                        for r in (f"It is {q['answer']}.", "Great question! It is red or 7.")]),
    }
    assert got == DEFAULT_DIGESTS[(seed, size)]


def test_sft_conversations_take_training_questions_only_at_the_second_language_share():
    # catches: SFT data built from every question (STaR's validation and test questions would be seen in SFT), the
    # second-language share ignored or inverted, and both languages drawing the same questions in the same order
    spec = {"seed": 42, "size": 1}
    convs = mcqa.sft_conversations(spec, 50, 0.2, seed=0)
    assert len(convs) == 50
    train = {mcqa.render_question(item) for language in ("en", "l2")
             for item in mcqa.load_world(language, "train", world_seed=42, world_size=1)}
    held_out = {mcqa.render_question(item) for language in ("en", "l2") for split in ("validation", "test")
                for item in mcqa.load_world(language, split, world_seed=42, world_size=1)}
    questions = [c[0]["content"] for c in convs]
    assert all(q in train and q not in held_out for q in questions)
    answers = [c[1]["content"] for c in convs]
    second = [mcqa.extract_answer(a, "en") is None for a in answers]  # "Thetul: X" is no English answer
    assert sum(second) == 10
    assert all(mcqa.extract_answer(a, "l2") is not None for a in answers)
