"""
A small made-up world: the offline default data for every stage of the pipeline.

The machines this runs on cannot reach a dataset hub, and the CPU speedrun trains a
~4M-parameter GPT from scratch in minutes. So instead of web text we invent a world
that is small enough for such a model to learn, and whose every answer can be checked:

- People (60 * size) with invented, syllable-built names. Each has a home city, a
  favourite colour, a job, a favourite food, a pet (species and name), an age, a
  favourite flower and an instrument. Cities (8 * size) have a river, a region
  (3 * size regions) and a population, which decides "which city is bigger".
  Attribute values come from small closed vocabularies, so answers are one word.
- Arithmetic on small integers: addition and subtraction up to 20, multiplication up
  to 10 x 10, and "which is larger" for numbers up to 30.

Everything is a pure function of (seed, size) plus the seed passed to each generator:
we only use `random.Random` instances seeded with strings (or with integers drawn from
one), never global state, set iteration or hash(), so outputs are identical across runs
and machines.

Generators (all on `World`):

- pretrain_documents: profiles stating facts in paraphrased templates, short
  consistent stories, city notes and arithmetic lines. Shares of DOC_KIND_WEIGHTS.
- chat_conversations: Q&A for mid-training and SFT. A SYSTEM_RATE share starts with
  a system message; a MULTI_TURN_RATE share asks 2-3 questions in a row. Follow-up
  questions are self-contained (they never say "and her pet?"), so the final user
  message alone decides the gold answer. Answers are correct; each assistant turn
  carries planted artifacts with probability `artifact_rate`, or, for the positive
  control, only turns answering questions from RARE_CLUSTERS do (a {cluster: rate} dict).
  With `free_clause_rate` > 0 (AutoDeco's data; 0 by default, which leaves every conversation as it was), that
  share of answers ends in a free clause: "Dover's favourite food is cake, as far as I know.", one of FREE_CLAUSES
  drawn uniformly, so one answer holds a token with one right value and tokens where any of many is as good.
  free_clause_span and World.answer_spans say which characters are which.
- preference_pairs: chosen = correct and plain; rejected kinds at REJECTED_KIND_RATES:
  "wrong" (a plain answer stating a wrong value), "evasive" (a non-answer) and
  "artifact" (a correct answer carrying planted artifacts). Length-balanced: among pairs
  whose replies differ in length (characters), the chosen one is the shorter in half
  (0.49-0.51 overall and per kind, over world seeds 0-3 and 42), so brevity does not
  predict the preferred reply. Artifact pairs get there by putting the artifacts on the
  shorter of two plain answers half the time; artifact draws that no pair of answers
  can outgrow are drawn again, so about 31% of artifact rejections carry two artifacts
  instead of TWO_ARTIFACT_RATE. About 13% of wrong replies use another template than
  the chosen one (see preference_pairs); the rest differ from it only in the fact.
- eval_questions: clusters drawn uniformly (so rare topics get measured too), and an
  EVAL_HELDOUT_RATE share of prompts use paraphrase templates that no training
  generator ever emits, to test the answer format rather than memorised strings.
- mc_items: multiple-choice questions for STaR (nanochat/mcqa.py loads them as world_en / world_l2), four options
  with distractors from the attribute's own values, single-hop and two-hop (MC_TWO_HOP), in English or in "l2", an
  invented language that replaces every template and vocabulary word and keeps names and numbers (translate);
  mc_reference gives each one's rationale (the facts that lead to the answer). No other generator uses them yet.

Prompts come from topic clusters with Zipf-like frequencies CLUSTER_WEIGHTS: "colour"
and "addition" carry 56% of prompts, eleven tail clusters carry under 5% each, and
the nine sparsest (RARE_CLUSTERS) 15.5% together. That skew is what density-aware
prompt sampling is meant to counteract.

Planted artifacts (the mode-collapse tells RLHF should remove): the em dash, "not just
X, but Y", "It's not X, it's Y", and the stock phrases "Great question!", "I hope this
helps!" and "In summary,". add_artifacts picks TWO_ARTIFACT_RATE of the time two,
otherwise one, of the four ARTIFACT_KINDS uniformly; count_artifacts finds them.

Gold scoring: score = clip(correct - ARTIFACT_PENALTY * artifacts, -1, 1). A response
is correct when it names the expected value and no rival value: naming several
candidate colours or several numbers is wrong, so listing everything cannot hack the
reward. Echoing the question's operand pair ("7 + 5 = 12.", "the larger of 4 and 9
is 9") is allowed. Numbers must be written as digits.

Later generators (math / QA / code tasks with checkable answers) fit the same mould: add a Cluster
with question templates, answer templates and items, and gold_score works unchanged.
"""

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from functools import cached_property

# -----------------------------------------------------------------------------
# Documented rates

# Share of prompts per topic cluster, densest first (sums to 1).
CLUSTER_WEIGHTS = {
    "colour": 0.32,
    "addition": 0.24,
    "home_city": 0.09,
    "job": 0.07,
    "food": 0.055,
    "pet": 0.04,
    "age": 0.03,
    "pet_name": 0.025,
    "subtraction": 0.025,
    "river": 0.02,
    "flower": 0.02,
    "instrument": 0.015,
    "region": 0.015,
    "bigger_city": 0.015,
    "multiplication": 0.01,
    "larger_number": 0.01,
}
# The sparse tail: every cluster of weight 0.025 or less, 9 clusters carrying 15.5% of prompts. The positive
# control (chat_sft --artifact_focus=rare) plants SFT's artifacts only in answers about these.
RARE_CLUSTERS = ("pet_name", "subtraction", "river", "flower", "instrument", "region", "bigger_city",
                 "multiplication", "larger_number")
REJECTED_KIND_RATES = {"wrong": 0.4, "evasive": 0.2, "artifact": 0.4}
DOC_KIND_WEIGHTS = {"profile": 0.35, "story": 0.25, "city": 0.10, "arithmetic": 0.30}
SYSTEM_RATE = 0.10  # conversations that open with a system message
MULTI_TURN_RATE = 0.20  # conversations with 2-3 user turns
FOLLOW_UP_OPENER_RATE = 0.5  # later user turns that start with "Thanks." etc.
EVAL_HELDOUT_RATE = 0.5  # eval prompts phrased with held-out templates
ARTIFACT_KINDS = ("em_dash", "not_just_but", "not_x_its_y", "stock_phrase")
TWO_ARTIFACT_RATE = 0.4  # artifacted answers carrying two kinds instead of one
ARTIFACT_PENALTY = 0.25  # gold score lost per artifact found

# -----------------------------------------------------------------------------
# Closed vocabularies. Values are single words, distinct across vocabularies, so a
# word-boundary match tells which attribute value a response names.

COLOURS = ("red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "grey", "gold", "silver")
JOBS = ("baker", "farmer", "teacher", "doctor", "painter", "sailor", "miner", "singer", "tailor", "potter",
        "builder", "weaver")
FOODS = ("apples", "bread", "cheese", "soup", "rice", "fish", "honey", "plums", "beans", "noodles", "pears", "cake")
PETS = ("cat", "dog", "owl", "goat", "rabbit", "parrot", "turtle", "horse", "frog", "hamster")
FLOWERS = ("tulip", "lily", "daisy", "orchid", "poppy", "lotus", "iris", "lilac", "marigold", "peony")
INSTRUMENTS = ("flute", "drum", "harp", "violin", "piano", "trumpet", "guitar", "banjo")

# -----------------------------------------------------------------------------
# Templates. Per cluster: ASK (questions used in training data), ASK_HELDOUT (only in
# eval_questions), SAY (plain answers), FACTS (pretraining sentences stating the fact).
# Fields: {name} person, {city} city, {a} {b} operands, {value} the gold answer,
# {a_value} the answer with its article, {foil} the other side of a comparison.

PET_FACTS = ("{name} has a pet {pet} named {pet_name}.", "{name} keeps {a_pet} called {pet_name}.",
             "{pet_name} is {name}'s {pet}.")

ASK = {
    "colour": ("What is {name}'s favourite colour?", "What colour does {name} like best?",
               "Which colour is {name}'s favourite?", "Tell me {name}'s favourite colour.",
               "What is the favourite colour of {name}?"),
    "home_city": ("Where does {name} live?", "Which city does {name} live in?", "What city is {name} from?",
                  "In which city is {name}'s home?", "Tell me where {name} lives."),
    "job": ("What does {name} do for a living?", "What is {name}'s job?", "What is {name}'s profession?",
            "What work does {name} do?", "Tell me {name}'s job."),
    "food": ("What is {name}'s favourite food?", "What food does {name} like best?", "What does {name} love to eat?",
             "Which food is {name}'s favourite?", "Tell me {name}'s favourite food."),
    "pet": ("What pet does {name} have?", "What kind of animal is {name}'s pet?",
            "Which animal does {name} keep as a pet?", "What is {name}'s pet?", "Tell me what pet {name} has."),
    "age": ("How old is {name}?", "What is {name}'s age?", "What age is {name}?", "Tell me how old {name} is.",
            "How many years old is {name}?"),
    "pet_name": ("What is the name of {name}'s {pet}?", "What is {name}'s {pet} called?",
                 "What did {name} name the {pet}?", "Tell me the name of {name}'s {pet}.",
                 "What name does {name}'s {pet} have?"),
    "flower": ("What is {name}'s favourite flower?", "Which flower does {name} like best?",
               "What flower does {name} love most?", "Tell me {name}'s favourite flower.",
               "Which flower is {name}'s favourite?"),
    "instrument": ("What instrument does {name} play?", "Which instrument does {name} play?",
                   "What is {name}'s instrument?", "Tell me which instrument {name} plays.",
                   "What does {name} play in the evenings?"),
    "river": ("Which river flows through {city}?", "What river runs through {city}?",
              "What is the river in {city} called?", "Which river is {city} built on?", "Tell me the river of {city}."),
    "region": ("Which region is {city} in?", "In what region does {city} lie?", "What region is {city} part of?",
               "Where is {city}? Which region?", "Tell me the region of {city}."),
    "bigger_city": ("Which city is bigger, {a} or {b}?", "Which is larger, the city of {a} or {b}?",
                    "Which has more people, {a} or {b}?", "Of {a} and {b}, which city is bigger?",
                    "Which of {a} and {b} is the bigger city?"),
    "addition": ("What is {a} + {b}?", "What is {a} plus {b}?", "Compute {a} + {b}.", "Add {a} and {b}.",
                 "How much is {a} + {b}?"),
    "subtraction": ("What is {a} - {b}?", "What is {a} minus {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}.",
                    "How much is {a} - {b}?"),
    "multiplication": ("What is {a} times {b}?", "What is {a} x {b}?", "Compute {a} x {b}.", "Multiply {a} by {b}.",
                       "How much is {a} times {b}?"),
    "larger_number": ("Which is larger, {a} or {b}?", "Which number is bigger, {a} or {b}?",
                      "What is the larger of {a} and {b}?", "Which is more, {a} or {b}?",
                      "Pick the larger number: {a} or {b}."),
}

ASK_HELDOUT = {
    "colour": ("Do you know which colour {name} likes most?", "{name} has a favourite colour. What is it?"),
    "home_city": ("Do you know the city {name} calls home?", "{name} lives in a city. Which one?"),
    "job": ("How does {name} earn a living?", "{name} has a job. What is it?"),
    "food": ("If you cooked for {name}, what should you make?", "{name} has a favourite food. What is it?"),
    "pet": ("Does {name} have a pet? What kind?", "What animal lives with {name}?"),
    "age": ("Do you know {name}'s age?", "What's the age of {name}?"),
    "pet_name": ("{name} has {a_pet}. What is its name?", "Do you know what {name}'s {pet} is called?"),
    "flower": ("If you brought {name} a flower, which one should it be?", "{name} has a favourite flower. What is it?"),
    "instrument": ("If {name} joined a band, what would {name} play?", "{name} plays an instrument. Which one?"),
    "river": ("If you visit {city}, which river will you see?", "{city} has a river. What is its name?"),
    "region": ("{city} belongs to a region. Which one?", "Do you know the region {city} lies in?"),
    "bigger_city": ("Between {a} and {b}, which city has more people living in it?",
                    "{a} or {b}: which one is the bigger city?"),
    "addition": ("What do you get when you add {a} and {b}?", "{a} + {b} equals what?"),
    "subtraction": ("What is left if you take {b} from {a}?", "{a} - {b} equals what?"),
    "multiplication": ("What is the product of {a} and {b}?", "{a} x {b} equals what?"),
    "larger_number": ("Of {a} and {b}, which number is greater?", "{a} or {b}: which one is larger?"),
}

# Plain answers name only the gold value (comparisons never repeat the loser), so they
# pass the strict "no rival value" rule of gold_score. The last, long one of each cluster
# leaves room for preference_pairs to put the artifacts on the shorter of two plain
# answers (see there); it is plain, and chat data uses it as often as the others.
SAY = {
    "colour": ("{name}'s favourite colour is {value}.", "{name} likes {value} best.", "It's {value}.",
               "{name}'s favourite colour is {value}, and it has been for as long as anyone can remember."),
    "home_city": ("{name} lives in {value}.", "{name}'s home is in {value}.", "It's {value}.",
                  "{name} lives in {value}, and that is where {name} has had a home for many years now."),
    "job": ("{name} is {a_value}.", "{name} works as {a_value}.", "{name} is {a_value} by trade.",
            "{name} works as {a_value}, and that is the work {name} has done every day for many years."),
    "food": ("{name}'s favourite food is {value}.", "{name} loves {value}.", "It's {value}.",
             "{name}'s favourite food is {value}, and {name} would happily eat it every day of the week."),
    "pet": ("{name} has {a_value}.", "{name}'s pet is {a_value}.", "It's {a_value}.",
            "{name} has {a_value} as a pet, and the two of them have been good friends for a long time."),
    "age": ("{name} is {value} years old.", "{name} is {value}.", "{name}'s age is {value}.",
            "{name} is {value} years old, as anyone who knows {name} well would be able to tell you."),
    "pet_name": ("{name}'s {pet} is called {value}.", "The {pet} is named {value}.", "Its name is {value}.",
                 "{name}'s {pet} is called {value}, and it comes running whenever it hears that name."),
    "flower": ("{name}'s favourite flower is the {value}.", "{name} likes the {value} best.", "It's the {value}.",
               "{name}'s favourite flower is the {value}, and {name} likes it more than any other flower."),
    "instrument": ("{name} plays the {value}.", "{name}'s instrument is the {value}.", "It's the {value}.",
                   "{name} plays the {value}, and {name} practises it for an hour or so in the evenings."),
    "river": ("The {value} flows through {city}.", "{city} lies on the {value}.", "It's the {value}.",
              "The river that flows through {city} is the {value}, and the city lies along its banks."),
    "region": ("{city} is in {value}.", "{city} lies in the region of {value}.", "It's in {value}.",
               "{city} is in {value}, and that is the region where you will find it on any good map."),
    "bigger_city": ("{value} is the bigger city.", "The bigger one is {value}.", "{value} is bigger.",
                    "{value} is the bigger city, with more people living in it than in the other one."),
    "addition": ("{a} + {b} = {value}.", "The answer is {value}.", "{a} plus {b} is {value}.",
                 "{a} plus {b} comes to {value}, which you can check by counting up one step at a time."),
    "subtraction": ("{a} - {b} = {value}.", "The answer is {value}.", "{a} minus {b} is {value}.",
                    "{a} minus {b} comes to {value}, which you can check by counting down one step at a time."),
    "multiplication": ("{a} x {b} = {value}.", "The answer is {value}.", "{a} times {b} is {value}.",
                       "{a} times {b} comes to {value}, which you can check by adding up equal groups."),
    "larger_number": ("The larger number is {value}.", "{value} is larger.", "It's {value}.",
                      "The larger number is {value}, since it comes after the other one when you count up."),
}

FACTS = {
    "colour": ("{name}'s favourite colour is {value}.", "{name} likes the colour {value} more than any other.",
               "The colour {name} loves most is {value}."),
    "home_city": ("{name} lives in {value}.", "{name}'s home is in the city of {value}.",
                  "{name} has a house in {value}."),
    "job": ("{name} works as {a_value}.", "{name} is {a_value} by trade.", "By day, {name} is {a_value}."),
    "food": ("{name}'s favourite food is {value}.", "{name} loves to eat {value}.",
             "More than anything, {name} enjoys {value}."),
    "pet": PET_FACTS,
    "age": ("{name} is {value} years old.", "{name}'s age is {value}.", "{name} turned {value} this year."),
    "pet_name": PET_FACTS,
    "flower": ("{name}'s favourite flower is the {value}.", "{name} loves the {value} more than any other flower.",
               "Of all flowers, {name} likes the {value} best."),
    "instrument": ("{name} plays the {value}.", "{name}'s instrument is the {value}.",
                   "In the evenings, {name} plays the {value}."),
    "river": ("The river {value} flows through {city}.", "{city} lies on the river {value}.",
              "{city} is built on the banks of the {value}."),
    "region": ("{city} is a city in {value}.", "{city} lies in the region of {value}.",
               "The region of {value} is home to {city}."),
    "bigger_city": ("{value} is bigger than {foil}.", "{foil} is smaller than {value}.",
                    "More people live in {value} than in {foil}."),
    "addition": ("{a} + {b} = {value}.", "{a} plus {b} is {value}."),
    "subtraction": ("{a} - {b} = {value}.", "{a} minus {b} is {value}."),
    "multiplication": ("{a} x {b} = {value}.", "{a} times {b} is {value}."),
    # both operand orders, so the fact behind "{b} or {a}?" is also stated verbatim
    "larger_number": ("The larger of {a} and {b} is {value}.", "The larger of {b} and {a} is {value}.",
                      "{value} is larger than {foil}."),
}

# Per-person pretraining documents; pet facts also state the pet's name.
PROFILE_CLUSTERS = ("colour", "home_city", "job", "food", "pet", "age", "flower", "instrument")
PROFILE_INTROS = ("Here is what people know about {name}.", "This is a note about {name}.",
                  "Everyone in {city} knows {name}.")

# Stories use person fields plus f_* fields of a friend; facts stay consistent by construction.
STORY_TIMES = ("morning", "afternoon", "evening", "day")
STORY_OPENINGS = (
    "One {time}, {name} the {job} went out into the streets of {city}.",
    "It was a quiet {time} in {city}, and {name} the {job} was already awake.",
    "{name} the {job} has lived in {city} for many years.",
)
STORY_MIDDLES = (
    "{name} put on {a_colour} coat, because {colour} is {name}'s favourite colour.",
    "{pet_name}, {name}'s {pet}, followed close behind.",
    "{name} walked along the {river}, the river that flows through {city}.",
    "At the market, {name} bought some {food}, since {name}'s favourite food is {food}.",
    "{name} stopped to smell {a_flower}, the flower {name} likes best.",
    "Later, {name} played the {instrument} for a while.",
    "{name} is {age} years old and still loves a long walk.",
)
STORY_FRIEND = (
    "{f_name} was carrying {f_a_colour} bag, since {f_colour} is {f_name}'s favourite colour.",
    "{f_name} talked about {f_pet_name}, {f_a_pet} waiting at home.",
    "The two of them shared some {f_food}, the food {f_name} loves most.",
    "{f_name} played the {f_instrument}, and {name} listened.",
)
STORY_MEETING = "On the way, {name} met {f_name}, {f_a_job} from {f_city}."
STORY_CLOSINGS = (
    "Then {name} went home, happy.",
    "It had been a good {time} for {name}.",
    "When the sun went down, {name} and {pet_name} rested at home.",
)

ARITHMETIC_CLUSTERS = {"addition": 0.4, "subtraction": 0.25, "multiplication": 0.2, "larger_number": 0.15}
ARITHMETIC_INTROS = ("Some sums to practise.", "Numbers and their answers.", "A page from a maths book.")

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer briefly.",
    "Answer questions about people, cities and numbers.",
    "Keep your answers short and plain.",
)
FOLLOW_UP_OPENERS = ("Thanks.", "Okay, thanks.", "Got it.", "One more question.")
# Non-answers from a few words to longer than any plain answer, so preference_pairs can
# always pick one shorter or longer than the chosen reply.
EVASIVE_ANSWERS = (
    "No idea.",
    "Who knows?",
    "That's hard to say.",
    "I don't really know, sorry.",
    "It depends on a lot of things.",
    "I can't say for certain.",
    "There are many possible answers to that.",
    "I'm afraid I can't give you a clear answer to that one, since it could be any number of different things.",
    "Honestly, that is the kind of question where I would only be guessing, so I would rather say nothing at all.",
)

# Artifact fillers carry no digits and no vocabulary word, so adding them never changes
# which value an answer names.
EM_DASH_TAILS = ("plain and simple", "no doubt about it", "simple as that", "that much is certain")
NOT_JUST_LINES = (
    "It's not just an answer, but a fact worth knowing.",
    "This is not only true, but also easy to remember.",
    "That is not merely a detail, but a key fact.",
)
NOT_X_LINES = ("It's not a guess, it's a fact.", "This is not an opinion, it's simply true.",
               "That's not a rumour, that's the truth.")
STOCK_PHRASES = ("great_question", "hope_this_helps", "in_summary")

# Free clauses (AutoDeco): "<fact>, <clause>." Each is as good as any other after any fact, so within one answer the
# best sampling temperature is low on the fact and high on the clause. Like the artifact fillers they carry no digit,
# no vocabulary word and no artifact, so gold_score judges the fact alone (tested); several share their first words
# ("as", "if", "or so"), so the choice is not always made at a clause's first token.
FREE_CLAUSES = (
    "as far as I know", "as far as I can tell", "as I recall", "as it happens", "as you might expect",
    "as everyone in town knows", "as luck would have it", "if I remember rightly", "if you were wondering",
    "if memory serves", "or so I have heard", "or so the story goes", "so I have been told", "by all accounts",
    "for what it is worth", "for the record", "in case you were curious", "to the best of my knowledge",
    "which is easy to remember", "which is good to know", "which surprises some people", "from what I have heard",
    "just so you know", "unless I am mistaken",
)

_BE = r"(?:it|that|this)(?:'s|\u2019s|\s+is)"
ARTIFACT_PATTERNS = {
    "em_dash": re.compile("\u2014"),  # U+2014 only; the en dash U+2013 is ordinary typography
    "not_just_but": re.compile(r"\bnot\s+(?:just|only|merely)\b[^.!?\n]{0,80}?\bbut\b", re.I),
    "not_x_its_y": re.compile(_BE + r"\s+not\b[^.!?\n]{0,80}?(?:,|;|\u2014|--)\s*" + _BE + r"\b", re.I),
    "great_question": re.compile(r"\bgreat question\b", re.I),
    "hope_this_helps": re.compile(r"\bi hope (?:this|that) helps\b", re.I),
    "in_summary": re.compile(r"\bin summary\b", re.I),
}
_NUMBER = re.compile(r"(?<!\d)\d+(?!\d)")
_ECHO_OPS = r"(?:\+|-|x|\*|plus|minus|times|and|or|from)"

# Invented names: consonant-vowel syllables, so BPE splits them into a few pieces.
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("", "", "n", "l", "r")

# -----------------------------------------------------------------------------
# Hashing shared with the preference-data stage


def _sha16(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def pair_id(src: str, messages: list, chosen: str, rejected: str) -> str:
    """Identity of one preference row: the exact conversation and both replies."""
    return _sha16(json.dumps([src, messages, chosen, rejected], sort_keys=True, ensure_ascii=False))


def conversation_id(messages: list) -> str:
    """Identity of a whole prompt conversation, blind to whitespace differences."""
    return _sha16(json.dumps([[m["role"], " ".join(m["content"].split())] for m in messages], ensure_ascii=False))


# -----------------------------------------------------------------------------
# Artifacts


def _with_article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _lower_first(sentence):
    # "In summary, the answer is 7." but keep capitals of names and "I"
    first = sentence.split(" ", 1)[0]
    return sentence[0].lower() + sentence[1:] if first in ("The", "It's", "Its") else sentence


def add_artifacts(answer: str, rng: random.Random) -> str:
    """Rewrite a correct answer to carry 1-2 planted artifacts; the stated fact is kept."""
    kinds = rng.sample(ARTIFACT_KINDS, 2 if rng.random() < TWO_ARTIFACT_RATE else 1)
    body = answer.strip()
    end = body[-1] if body and body[-1] in ".!?" else "."
    core = body[:-1] if body and body[-1] in ".!?" else body
    if "em_dash" in kinds:
        core += "\u2014" + rng.choice(EM_DASH_TAILS)
    text = core + end
    if "not_just_but" in kinds:
        text += " " + rng.choice(NOT_JUST_LINES)
    if "not_x_its_y" in kinds:
        text += " " + rng.choice(NOT_X_LINES)
    if "stock_phrase" in kinds:
        phrase = rng.choice(STOCK_PHRASES)
        if phrase == "great_question":
            text = "Great question! " + text
        elif phrase == "hope_this_helps":
            text += " I hope this helps!"
        else:
            text += " In summary, " + _lower_first(body)
    return text


def count_artifacts(text: str) -> dict:
    """Artifact name -> number of occurrences in text (every name present, zeros included)."""
    return {name: len(pattern.findall(text)) for name, pattern in ARTIFACT_PATTERNS.items()}


def add_free_clause(answer: str, clause: str) -> str:
    """"X is 7." -> "X is 7, <clause>.": the clause goes before the answer's final punctuation."""
    body = answer.strip()
    end = body[-1] if body and body[-1] in ".!?" else "."
    core = body[:-1] if body and body[-1] in ".!?" else body
    return f"{core}, {clause}{end}"


# longest first, so a clause that begins another cannot take its place
_FREE_CLAUSE = re.compile(", (" + "|".join(re.escape(c) for c in sorted(FREE_CLAUSES, key=len, reverse=True))
                          + r")(?!\w)")


def free_clause_span(text: str):
    """(start, end) of the first free clause in text (one of FREE_CLAUSES right after ", "), or None."""
    match = _FREE_CLAUSE.search(text)
    return match.span(1) if match else None


def _by_length(options, reply):
    """options grouped by length (characters) against reply: {-1: shorter, 0: as long, 1: longer}."""
    groups = {-1: [], 0: [], 1: []}
    for option in options:
        groups[(len(option) > len(reply)) - (len(option) < len(reply))].append(option)
    return groups


# -----------------------------------------------------------------------------
# The world


@dataclass
class Person:
    name: str
    city: str
    colour: str
    job: str
    food: str
    pet: str
    pet_name: str
    age: int
    flower: str
    instrument: str


@dataclass
class City:
    name: str
    river: str
    region: str
    population: int  # thousands of people


@dataclass
class Cluster:
    """One topic (its templates live in ASK, ASK_HELDOUT, SAY and FACTS under the same name)."""
    name: str
    items: list  # template fields per askable subject; "value" is the gold answer
    candidates: tuple  # every value a response could name for this topic; empty when numeric


@dataclass
class Question:
    cluster: str
    prompt: str
    answer: str
    fields: dict


def _strip_echo(response, fields):
    # Repeating the question's operand pair ("7 + 5 = 12.", "the larger of 4 and 9 is 9")
    # is not naming a rival answer; cut it out before looking for values.
    if "a" not in fields:
        return response
    a, b = re.escape(str(fields["a"])), re.escape(str(fields["b"]))
    pair = rf"(?<!\w)(?:{a}\s*{_ECHO_OPS}\s*{b}|{b}\s*{_ECHO_OPS}\s*{a})(?!\w)"
    return re.sub(pair, " ", response, flags=re.I)


def _norm(text):
    return " ".join(text.split()).lower()


def _reserved_words():
    # Invented names must not collide with any word our templates or vocabularies use,
    # or gold_score could mistake an ordinary word for a name.
    texts = [COLOURS, JOBS, FOODS, PETS, FLOWERS, INSTRUMENTS, STORY_TIMES, STORY_OPENINGS, STORY_MIDDLES,
             STORY_FRIEND, (STORY_MEETING,), STORY_CLOSINGS, PROFILE_INTROS, ARITHMETIC_INTROS, SYSTEM_PROMPTS,
             FOLLOW_UP_OPENERS, EVASIVE_ANSWERS, EM_DASH_TAILS, NOT_JUST_LINES, NOT_X_LINES]
    for table in (ASK, ASK_HELDOUT, SAY, FACTS):
        texts.extend(table.values())
    return {word for group in texts for line in group for word in re.findall(r"[a-z]+", line.lower())}


def _invent_names(rng, count, syllables, suffix, taken):
    names = []
    for _ in range(1000 + 100 * count):
        if len(names) == count:
            return names
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables))
        word = (word + (suffix or rng.choice(CODAS))).capitalize()
        if word.lower() not in taken and not word.endswith("e"):  # a silent e reads as English (Mode, Tone)
            taken.add(word.lower())
            names.append(word)
    raise ValueError(f"ran out of invented names after {len(names)} of {count}; is size too large?")


def _person_fields(p, cities, prefix=""):
    fields = {"name": p.name, "city": p.city, "colour": p.colour, "job": p.job, "food": p.food, "pet": p.pet,
              "pet_name": p.pet_name, "age": p.age, "flower": p.flower, "instrument": p.instrument,
              "river": cities[p.city].river, "a_colour": _with_article(p.colour), "a_job": _with_article(p.job),
              "a_pet": _with_article(p.pet), "a_flower": _with_article(p.flower)}
    return {prefix + key: value for key, value in fields.items()}


def _build_clusters(people, cities, regions):
    def person_items(attr, **extra):
        return [{"name": p.name, "value": str(getattr(p, attr)), "a_value": _with_article(str(getattr(p, attr))),
                 **{k: fn(p) for k, fn in extra.items()}} for p in people]

    city_names = tuple(c.name for c in cities)
    specs = [
        Cluster("colour", person_items("colour"), COLOURS),
        Cluster("home_city", person_items("city"), city_names),
        Cluster("job", person_items("job"), JOBS),
        Cluster("food", person_items("food"), FOODS),
        Cluster("pet", person_items("pet", pet=lambda p: p.pet, pet_name=lambda p: p.pet_name,
                                    a_pet=lambda p: _with_article(p.pet)), PETS),
        Cluster("age", person_items("age"), ()),
        Cluster("pet_name", person_items("pet_name", pet=lambda p: p.pet, pet_name=lambda p: p.pet_name,
                                         a_pet=lambda p: _with_article(p.pet)), tuple(p.pet_name for p in people)),
        Cluster("flower", person_items("flower"), FLOWERS),
        Cluster("instrument", person_items("instrument"), INSTRUMENTS),
        Cluster("river", [{"city": c.name, "value": c.river} for c in cities], tuple(c.river for c in cities)),
        Cluster("region", [{"city": c.name, "value": c.region} for c in cities], tuple(regions)),
        Cluster("bigger_city", [{"a": x.name, "b": y.name, **_bigger(x, y)}
                                for x in cities for y in cities if x is not y], city_names),
        Cluster("addition", [{"a": a, "b": b, "value": str(a + b)} for a in range(21) for b in range(21)], ()),
        Cluster("subtraction", [{"a": a, "b": b, "value": str(a - b)} for a in range(21) for b in range(a + 1)], ()),
        Cluster("multiplication", [{"a": a, "b": b, "value": str(a * b)}
                                   for a in range(1, 11) for b in range(1, 11)], ()),
        Cluster("larger_number", [{"a": a, "b": b, "value": str(max(a, b)), "foil": str(min(a, b))}
                                  for a in range(1, 31) for b in range(1, 31) if a != b], ()),
    ]
    return {c.name: c for c in sorted(specs, key=lambda c: list(CLUSTER_WEIGHTS).index(c.name))}


def _bigger(x, y):
    big, small = (x, y) if x.population > y.population else (y, x)
    return {"value": big.name, "foil": small.name}


@dataclass
class World:
    seed: int
    size: int
    people: list = field(repr=False)
    cities: list = field(repr=False)
    regions: list = field(repr=False)
    specs: dict = field(repr=False)  # cluster name -> Cluster, densest first

    @property
    def clusters(self) -> list:
        return list(self.specs)

    # --- questions and answers

    def _sample_cluster(self, rng):
        return rng.choices(self.clusters, weights=[CLUSTER_WEIGHTS[c] for c in self.clusters])[0]

    def _ask(self, rng, cluster, heldout=False):
        item = rng.choice(self.specs[cluster].items)
        template = rng.choice((ASK_HELDOUT if heldout else ASK)[cluster])
        return Question(cluster, template.format(**item), item["value"], item)

    def _wrong_values(self, q):
        spec = self.specs[q.cluster]
        if "foil" in q.fields:  # comparisons: the natural mistake is the other side
            return [q.fields["foil"]]
        if spec.candidates:
            return [c for c in spec.candidates if c != q.answer]
        n = int(q.answer)
        return [str(v) for v in range(max(0, n - 3), n + 4) if v != n]

    def _reply(self, rng, q, rates, free=None):
        answer = rng.choice(SAY[q.cluster]).format(**q.fields)
        # free clauses draw from their own stream: `rng` draws exactly what it draws without them
        if free is not None and free[0].random() < free[1]:
            answer = add_free_clause(answer, free[0].choice(FREE_CLAUSES))
        return add_artifacts(answer, rng) if rng.random() < rates.get(q.cluster, 0.0) else answer

    def _conversation(self, rng, rates, free=None):
        """
        Messages ending in a user turn, and the Question that turn asks; `rates`: {cluster: artifact rate}, `free`:
        (random stream, rate) of free clauses, or None.
        """
        messages = []
        if rng.random() < SYSTEM_RATE:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        turns = rng.choice((2, 3)) if rng.random() < MULTI_TURN_RATE else 1
        for turn in range(turns):
            q = self._ask(rng, self._sample_cluster(rng))
            opener = turn and rng.random() < FOLLOW_UP_OPENER_RATE
            content = f"{rng.choice(FOLLOW_UP_OPENERS)} {q.prompt}" if opener else q.prompt
            messages.append({"role": "user", "content": content})
            if turn < turns - 1:
                messages.append({"role": "assistant", "content": self._reply(rng, q, rates, free)})
        return messages, q

    def chat_conversations(self, n: int, seed: int, artifact_rate=0.15, free_clause_rate=0.0) -> list:
        """
        n conversations for mid-training / SFT. Each assistant turn is artifacted with probability artifact_rate,
        or, when that is a {cluster: rate} dict, with the rate of its question's cluster (0 for clusters left
        out): {c: rate for c in RARE_CLUSTERS} is the positive control. The draws are the same either way, so a
        dict giving every cluster one rate yields the conversations of that rate, and the world is unchanged.
        Each assistant turn ends in a free clause (add_free_clause, before any artifacts) with probability
        free_clause_rate; those draws come from a stream of their own, so the conversations are otherwise the ones
        of free_clause_rate=0 (the default, which draws nothing from it).
        """
        rates = artifact_rate if isinstance(artifact_rate, dict) else dict.fromkeys(self.clusters, artifact_rate)
        rng = random.Random(f"chat-{seed}")
        free = (random.Random(f"free-clause-{seed}"), free_clause_rate) if free_clause_rate > 0 else None
        conversations = []
        for _ in range(n):
            messages, q = self._conversation(rng, rates, free)
            conversations.append(messages + [{"role": "assistant", "content": self._reply(rng, q, rates, free)}])
        return conversations

    def preference_pairs(self, n: int, seed: int) -> list:
        """
        n preference rows; rejected kinds drawn at REJECTED_KIND_RATES. Lengths are balanced so that brevity is
        no shortcut to the preferred reply: a fair coin per row says whether the chosen reply is to be the shorter
        (in characters), and the rejected one is drawn on that side where the kind allows, else as long, else on
        the other side. A wrong reply keeps the chosen reply's template, so only the fact differs, unless no wrong
        value moves the length the coin's way but some move it the other way; an evasive reply is one of
        EVASIVE_ANSWERS; an artifact pair comes from _artifact_pair.
        """
        rng = random.Random(f"pairs-{seed}")
        kinds, weights = list(REJECTED_KIND_RATES), list(REJECTED_KIND_RATES.values())
        rows = []
        for _ in range(n):
            messages, q = self._conversation(rng, rates={})  # prompts only: no earlier turn artifacted
            kind = rng.choices(kinds, weights)[0]
            chosen_shorter = rng.random() < 0.5
            if kind == "artifact":
                chosen, rejected = self._artifact_pair(rng, q, chosen_shorter)
            else:
                template = rng.choice(SAY[q.cluster])
                chosen = template.format(**q.fields)
                want = 1 if chosen_shorter else -1  # the rejected reply longer (1) or shorter (-1) than the chosen
                if kind == "wrong":
                    wrong = [{**q.fields, "value": v, "a_value": _with_article(v)} for v in self._wrong_values(q)]
                    options = _by_length([template.format(**f) for f in wrong], chosen)
                    if not options[want] and options[-want]:
                        # a wrong value can only move the length the other way (all colours are longer than
                        # "red"): another template does it, so that such values do not tip the balance
                        others = [t.format(**f) for t in SAY[q.cluster] if t != template for f in wrong]
                        options[want] = _by_length(others, chosen)[want]
                else:
                    options = _by_length(EVASIVE_ANSWERS, chosen)
                rejected = rng.choice(options[want] or options[0] or options[-want])
            rows.append({"id": pair_id("synthetic", messages, chosen, rejected), "prompt": messages[-1]["content"],
                         "messages": messages, "chosen": chosen, "rejected": rejected, "src": "synthetic",
                         "prompt_id": conversation_id(messages), "cluster": q.cluster, "rejected_kind": kind})
        return rows

    def _artifact_pair(self, rng, q, chosen_shorter):
        """
        (chosen, rejected) for an artifact pair: two plain answers to q, one kept plain and the other given
        artifacts. Artifacts only add text, so artifacting the chosen reply itself would always make the rejected
        one longer. Instead one draw of artifacts is applied alike to every SAY template, a pair (long, short) is
        picked among those whose long plain answer is still longer than the artifacted short one, and the coin
        puts the artifacts on the short one (chosen is longer) or on the long one (chosen is shorter). Both sides
        use the same pairs, so each template is as often in the chosen reply as in the rejected one. Artifacts that
        no pair can outgrow (two long ones, about one draw in eight) are drawn again.
        """
        plain = [t.format(**q.fields) for t in SAY[q.cluster]]
        while True:  # ends: any one artifact fits, as each long answer is 58+ characters longer than the shortest
            artifact_seed = rng.getrandbits(64)  # the same artifacts, whichever answer gets them
            fancy = [add_artifacts(p, random.Random(artifact_seed)) for p in plain]
            fits = [(i, j) for i in range(len(plain)) for j in range(len(plain)) if len(plain[i]) > len(fancy[j])]
            if fits:
                long, short = rng.choice(fits)
                return (plain[short], fancy[long]) if chosen_shorter else (plain[long], fancy[short])

    def eval_questions(self, n: int, seed: int) -> list:
        """n held-out single-turn questions, clusters uniform, prompts distinct while possible."""
        rng = random.Random(f"eval-{seed}")
        seen, out = set(), []
        while len(out) < n:
            cluster = rng.choice(self.clusters)
            for _ in range(10):  # redraw a few times to avoid repeats; small clusters run out
                q = self._ask(rng, cluster, heldout=rng.random() < EVAL_HELDOUT_RATE)
                if q.prompt not in seen:
                    break
            seen.add(q.prompt)
            messages = [{"role": "user", "content": q.prompt}]
            out.append({"messages": messages, "prompt": q.prompt, "cluster": cluster, "answer": q.answer,
                        "prompt_id": conversation_id(messages)})
        return out

    def free_clause_answer(self, messages_or_prompt, rng) -> str:
        """A correct plain answer to a question, ending in a free clause; both drawn uniformly with rng."""
        q = self.lookup(messages_or_prompt)
        return add_free_clause(rng.choice(SAY[q.cluster]).format(**q.fields), rng.choice(FREE_CLAUSES))

    # --- gold scoring

    @cached_property
    def _index(self):
        index = {}
        for name, spec in self.specs.items():
            for template in ASK[name] + ASK_HELDOUT[name]:
                for i, item in enumerate(spec.items):
                    key = _norm(template.format(**item))
                    if index.setdefault(key, (name, i)) != (name, i):
                        raise ValueError(f"two questions share the prompt {key!r}")
        return index

    def lookup(self, messages_or_prompt) -> Question:
        """The Question behind a prompt string or a conversation (its last user message)."""
        if isinstance(messages_or_prompt, str):
            prompt = messages_or_prompt
        else:
            prompt = [m for m in messages_or_prompt if m["role"] == "user"][-1]["content"]
        key = _norm(prompt)
        for opener in FOLLOW_UP_OPENERS:
            if key not in self._index and key.startswith(_norm(opener) + " "):
                key = key[len(opener) + 1:]
        if key not in self._index:
            raise KeyError(f"not a question of this world (seed={self.seed}, size={self.size}): {prompt!r}")
        name, i = self._index[key]
        item = self.specs[name].items[i]
        return Question(name, prompt, item["value"], item)

    def facts_for(self, messages_or_prompt) -> list:
        """Every pretraining sentence that states the fact a question asks about."""
        q = self.lookup(messages_or_prompt)
        return [template.format(**q.fields) for template in FACTS[q.cluster]]

    def _named(self, q, response):
        """The values of q's cluster that a response names (lowercased; numbers normalised), echoes left out."""
        text = _strip_echo(response, q.fields)
        spec = self.specs[q.cluster]
        if spec.candidates:
            return {m.lower() for m in self._candidate_patterns[q.cluster].findall(text)}
        return {str(int(x)) for x in _NUMBER.findall(text)}

    def _is_correct(self, q, response):
        return self._named(q, response) == {q.answer.lower()}

    def named_value(self, messages_or_prompt, response):
        """The one value a response names for its question (lowercased), None if it names none or several: a vote."""
        named = self._named(self.lookup(messages_or_prompt), response)
        return next(iter(named)) if len(named) == 1 else None

    def answer_spans(self, messages_or_prompt, response) -> dict:
        """
        Where a response states its question's one right value and where its free clause is, as (start, end)
        character spans or None: {"value": the last mention of the gold value before the clause ("7 + 5 = 12":
        the 12, not an echoed operand), "free": free_clause_span(response)}.
        """
        q = self.lookup(messages_or_prompt)
        free = free_clause_span(response)
        fact = response[:free[0]] if free else response
        pattern = rf"(?<!\d){re.escape(q.answer)}(?!\d)" if q.answer.isdigit() else rf"\b{re.escape(q.answer)}\b"
        values = list(re.finditer(pattern, fact, re.I))
        return {"value": values[-1].span() if values else None, "free": free}

    @cached_property
    def _candidate_patterns(self):
        patterns = {}
        for name, spec in self.specs.items():
            if spec.candidates:  # longest first so a value that prefixes another cannot steal its match
                values = sorted(spec.candidates, key=len, reverse=True)
                patterns[name] = re.compile(r"\b(?:" + "|".join(re.escape(v) for v in values) + r")\b", re.I)
        return patterns

    def gold_score(self, messages_or_prompt, response: str) -> dict:
        """{"correct": 0/1, "artifacts": count, "score": clip(correct - ARTIFACT_PENALTY * artifacts, -1, 1)}."""
        q = self.lookup(messages_or_prompt)
        correct = int(self._is_correct(q, response))
        artifacts = sum(count_artifacts(response).values())
        score = max(-1.0, min(1.0, correct - ARTIFACT_PENALTY * artifacts))
        return {"correct": correct, "artifacts": artifacts, "score": score}

    # --- pretraining text

    def pretrain_documents(self, n: int, seed: int) -> list:
        """n documents of plain text (profiles, stories, city notes, arithmetic) at DOC_KIND_WEIGHTS."""
        rng = random.Random(f"pretrain-{seed}")
        makers = {"profile": self._profile_doc, "story": self._story_doc, "city": self._city_doc,
                  "arithmetic": self._arithmetic_doc}
        kinds = rng.choices(list(DOC_KIND_WEIGHTS), weights=list(DOC_KIND_WEIGHTS.values()), k=n)
        return [makers[kind](rng) for kind in kinds]

    def _fact(self, rng, cluster, i):
        return rng.choice(FACTS[cluster]).format(**self.specs[cluster].items[i])

    def _profile_doc(self, rng):
        paragraphs = []
        for i in rng.sample(range(len(self.people)), rng.choice((1, 1, 2, 3))):
            facts = [self._fact(rng, c, i) for c in PROFILE_CLUSTERS]
            rng.shuffle(facts)
            intro = rng.choice(PROFILE_INTROS).format(name=self.people[i].name, city=self.people[i].city)
            paragraphs.append(" ".join([intro] + facts))
        return "\n\n".join(paragraphs)

    def _story_doc(self, rng):
        by_name = {c.name: c for c in self.cities}
        hero, friend = rng.sample(self.people, 2)
        fields = {**_person_fields(hero, by_name), **_person_fields(friend, by_name, "f_"),
                  "time": rng.choice(STORY_TIMES)}
        sentences = [rng.choice(STORY_OPENINGS)] + rng.sample(STORY_MIDDLES, rng.randint(3, 6))
        if rng.random() < 0.6:
            sentences += [STORY_MEETING] + rng.sample(STORY_FRIEND, rng.randint(1, 3))
        sentences.append(rng.choice(STORY_CLOSINGS))
        return " ".join(s.format(**fields) for s in sentences)

    def _city_doc(self, rng):
        i = rng.randrange(len(self.cities))
        city = self.cities[i]
        sentences = [self._fact(rng, "river", i), self._fact(rng, "region", i),
                     f"About {city.population} thousand people live in {city.name}."]
        others = [c for c in self.cities if c is not city]
        for other in rng.sample(others, min(4, len(others))):
            sentences.append(rng.choice(FACTS["bigger_city"]).format(**_bigger(city, other)))
        residents = [p.name for p in self.people if p.city == city.name]
        if residents:
            shown = rng.sample(residents, min(5, len(residents)))
            listed = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]
            sentences.append(f"{listed} {'lives' if len(shown) == 1 else 'live'} in {city.name}.")
        return " ".join(sentences)

    def _arithmetic_doc(self, rng):
        lines = [rng.choice(ARITHMETIC_INTROS)]
        if rng.random() < 0.3:  # a whole table row, the way children learn them
            cluster = rng.choice(("addition", "subtraction", "multiplication"))
            a = rng.choice(self.specs[cluster].items)["a"]
            lines += [FACTS[cluster][0].format(**item) for item in self.specs[cluster].items if item["a"] == a]
        names, weights = list(ARITHMETIC_CLUSTERS), list(ARITHMETIC_CLUSTERS.values())
        for cluster in rng.choices(names, weights, k=rng.randint(12, 30)):
            lines.append(rng.choice(FACTS[cluster]).format(**rng.choice(self.specs[cluster].items)))
        return "\n".join(lines)

    # --- multiple choice (STaR)

    def mc_items(self, language: str = "en") -> list:
        """
        Every multiple-choice question of the world as mcqa items (see nanochat/mcqa.py) in "en" or "l2": each
        single-hop kind (MC_SINGLE_HOP) of every subject and each two-hop kind (MC_TWO_HOP) of every person.
        The order is a fixed shuffle, so that a prefix mixes kinds; it, the choices and the ids
        "world_<language>/<seed>-<size>/<kind>/<index>" depend only on the world, and are the same in both languages.
        """
        keys = [(kind, i) for kind in MC_SINGLE_HOP for i in range(len(self.specs[kind].items))]
        keys += [(kind, i) for kind in MC_TWO_HOP for i in range(len(self.people))]
        random.Random(f"mc-order-{self.seed}-{self.size}").shuffle(keys)
        items = []
        for kind, i in keys:
            question, choices, gold, _ = self._mc_question(kind, i)
            items.append({"id": f"world_{language}/{self.seed}-{self.size}/{kind}/{i}",
                          "question": translate(question, language),
                          "choices": [translate(choice, language) for choice in choices], "answer": "ABCD"[gold],
                          "subject": kind, "language": language})
        return items

    def mc_reference(self, item) -> tuple:
        """(rationale, answer letter) for an item of mc_items: the fact sentences that lead to the answer."""
        _, world, kind, i = item["id"].split("/")
        if world != f"{self.seed}-{self.size}":
            raise ValueError(f"item {item['id']!r} is not about this world (seed={self.seed}, size={self.size})")
        _, _, gold, facts = self._mc_question(kind, int(i))
        return translate(" ".join(facts), item["language"]), "ABCD"[gold]

    def _mc_question(self, kind, i):
        """(question, four choices, index of the right one, fact sentences), in English, for one kind and subject."""
        rng = random.Random(f"mc-{self.seed}-{self.size}-{kind}-{i}")
        if kind in MC_TWO_HOP:
            template, first, cluster = MC_TWO_HOP[kind]
            via = self.specs[first].items[i]
            # a city's fact is about the person's home city; a person's fact about the same person
            j = [c.name for c in self.cities].index(via["value"]) if first == "home_city" else i
            item = self.specs[cluster].items[j]
            question, facts = template.format(**via), [FACTS[first][0].format(**via)]
        else:
            cluster, item = kind, self.specs[kind].items[i]
            question, facts = rng.choice(ASK[kind]).format(**item), []
        facts.append(FACTS[cluster][0].format(**item))
        wrong = rng.sample(self._wrong_values(Question(cluster, question, item["value"], item)), 3)
        choices = [item["value"]] + wrong
        rng.shuffle(choices)
        return question, choices, choices.index(item["value"]), facts


def make_world(seed: int = 0, size: int = 1) -> World:
    """The world for (seed, size); size scales people (60x), cities (8x) and regions (3x)."""
    rng = random.Random(f"world-{seed}-{size}")
    taken = _reserved_words()
    regions = _invent_names(rng, 3 * size, 2, "ria", taken)
    city_names = _invent_names(rng, 8 * size, 3, "", taken)
    rivers = _invent_names(rng, 8 * size, 2, "", taken)
    populations = rng.sample(range(10, 10 + 40 * 8 * size), 8 * size)  # distinct, so "bigger" is always decided
    cities = [City(name, river, rng.choice(regions), pop) for name, river, pop in zip(city_names, rivers, populations)]
    names = _invent_names(rng, 60 * size, 2, "", taken)
    pet_names = _invent_names(rng, 60 * size, 2, "", taken)
    people = [Person(name, rng.choice(cities).name, rng.choice(COLOURS), rng.choice(JOBS), rng.choice(FOODS),
                     rng.choice(PETS), pet_name, rng.randint(18, 79), rng.choice(FLOWERS), rng.choice(INSTRUMENTS))
              for name, pet_name in zip(names, pet_names)]
    return World(seed, size, people, cities, regions, _build_clusters(people, cities, regions))


# -----------------------------------------------------------------------------
# Multiple choice in English and in "l2", an invented second language (STaR, issue 14)

# Single-hop kinds ask one fact of a Cluster with one of its ASK templates; the reference rationale states that fact.
# "region" is left out: a size-1 world has only 3 regions, too few for four options.
MC_SINGLE_HOP = ("colour", "home_city", "job", "food", "pet", "age", "pet_name", "flower", "instrument", "river")
# Two-hop kinds: (question, first cluster, second cluster). The question names the first fact's subject, the answer
# is the second fact's value, and the rationale states both: "Bimo" -> "Dover has a pet cat named Bimo." -> "Dover's
# favourite colour is red.". The hop goes through something that picks one subject: a pet name has one owner and a
# person one home city (a city has many residents, so "the person who lives in Korta" would be ambiguous).
MC_TWO_HOP = {
    "river_of_home": ("Which river flows through the city where {name} lives?", "home_city", "river"),
    "owner_colour": ("What colour does the owner of {pet_name} like best?", "pet_name", "colour"),
    "owner_job": ("What is the job of the owner of {pet_name}?", "pet_name", "job"),
    "owner_food": ("What food does the owner of {pet_name} like best?", "pet_name", "food"),
    "owner_home_city": ("Which city does the owner of {pet_name} live in?", "pet_name", "home_city"),
    "owner_instrument": ("Which instrument does the owner of {pet_name} play?", "pet_name", "instrument"),
}
MC_LANGUAGES = ("en", "l2")

# l2 is English with every word of the world's templates and vocabularies replaced, token by token, by an invented
# word; names, digits, punctuation and single capital letters (the option letters, the "X" of the answer format, "I")
# are kept, so an l2 question asks about the same people as its English twin. L2_EXTRA_WORDS are the words of
# mcqa's English preamble and answer label that no template here uses: mcqa translates those (it imports this
# module, not the other way round).
L2_EXTRA_WORDS = ("answer", "think", "step", "by", "briefly", "then", "end", "with", "the", "line", "where", "is",
                  "or")
# An l2 word starts with one of these onsets, which no invented name starts with (a name's second letter is a
# vowel), so an l2 word is never taken for a name, nor a name for an l2 word.
L2_ONSETS = ("h", "w", "y", "j", "ch", "sh", "th")
_WORD = re.compile(r"[A-Za-z]+")


def _l2_word(rng, syllables):
    word = rng.choice(L2_ONSETS) + rng.choice(VOWELS)
    word += "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables - 1))
    return word + rng.choice(CODAS)


def _l2_lexicon():
    """{English word: l2 word}, lowercase, a bijection onto words that are neither English words here nor names."""
    words = set(_reserved_words()) | set(L2_EXTRA_WORDS)
    for template, _, _ in MC_TWO_HOP.values():
        words.update(re.findall(r"[a-z]+", template.lower()))
    lexicon, used = {}, set(words)
    for word in sorted(words):
        # each word draws from its own stream, so adding a word later moves no other word (unless they collide)
        rng = random.Random(f"l2-{word}")
        while True:
            l2 = _l2_word(rng, 1 + len(word) // 4)
            if l2 not in used:
                break
        used.add(l2)
        lexicon[word] = l2
    return lexicon


L2_LEXICON = _l2_lexicon()


def translate(text: str, language: str) -> str:
    """text in "en" (unchanged) or "l2" (L2_LEXICON word by word, first capitals kept); l2 rejects unknown words."""
    if language == "en":
        return text
    if language != "l2":
        raise ValueError(f"the world speaks {', '.join(MC_LANGUAGES)}, not {language!r}")

    def word(match):
        w = match.group()
        if len(w) == 1 and w.isupper():
            return w  # an option letter, the "X" of the answer format, or "I"
        if w.lower() in L2_LEXICON:
            l2 = L2_LEXICON[w.lower()]
            return l2.capitalize() if w[0].isupper() else l2
        if w[0].isupper():
            return w  # a name
        raise ValueError(f"no l2 word for {w!r} in {text!r}; add the template it comes from to _l2_lexicon")
    return _WORD.sub(word, text)
