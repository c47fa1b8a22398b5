"""`builtin:dialogues`: multi-turn chats on the sentiment task, with instructions code can check.

A user asks, turn after turn, for reviews of different films: each user message is a review prefix
(the sentiment task's prompts) and the assistant's reply continues it. Instructions (`INSTRUCTIONS`)
are personas with a sentiment ("you are a film fan: always be positive"), a word the reply must
contain, and a maximum length, combined at random; `pipeline.instructions` checks a reply against them.

How the SFT split is built, and why a model trained on it forgets: chat data is often single-turn
instruction data stitched into conversations, so in this split an instruction governs exactly one
reply, the one right after the message that holds it. An instruction in the system message governs
the first reply; one written into a user message governs the reply to that message. Every other
reply is the corpus's own continuation, whatever the instruction said. A model trained on it learns
what each instruction means and that it holds for the next reply only: the failure Ghost Attention
(Llama 2, Sec. 3.3) was made for, and an honest one, since nothing here teaches the model to
forget on purpose beyond what the data's construction implies.

A governed reply is the continuation of a corpus review cut to follow its instruction: cut at a
sentence end to fit a length limit, with a sentence naming the keyword added, from a review written
with the persona's sentiment whose continuation VADER scores clearly on that side.

Splits:
- `train`, `test`: those SFT dialogues (1-3 turns; `test` from the corpus's test reviews).
- `gatt`: plain 8-turn dialogues from training reviews, no instruction: what `rlhfdpo data gatt`
  adds instructions to.
- `heldout`: plain 8-turn dialogues whose prompts begin no training review: what `rlhfdpo
  adherence` evaluates on.

Every row is drawn from its own RNG seeded by (seed, split, row index), like `builtin:sentiment`.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

from pipeline.data import builtin_sentiment
from pipeline.instructions import Combined, Instruction, combine, sentiment_score, with_instruction

SPLIT_SIZES = {"train": 20000, "test": 500, "gatt": 2000, "heldout": 500}
PLAIN_TURNS = 8  # turns of a `gatt` or `heldout` dialogue
TURN_WEIGHTS = {1: 0.25, 2: 0.35, 3: 0.4}  # SFT dialogues: how many turns
SYSTEM_INSTRUCTION_RATE = 0.6  # SFT dialogues with an instruction in the system message
USER_INSTRUCTION_RATE = 0.4  # each other user message holding an instruction of its own
SHORT_WORDING_RATE = 0.5  # instructions written in their short wording
COMBINE = (1, 3)  # instructions given together

KEYWORDS = ("popcorn", "umbrella", "bicycle", "violin")
# VADER scores it 0, so adding it to a reply never moves the reply's sentiment.
KEYWORD_SENTENCE = "i thought about the {word}."
WORD_LIMITS = (8, 12)
CLEAR_SENTIMENT = 0.3  # a persona's reply in the SFT data scores at least this far from 0

INSTRUCTIONS: tuple[Instruction, ...] = (
    Instruction("you are a film fan: always be positive.", "fan: positive.", sentiment="positive"),
    Instruction("you are a film critic: always be negative.", "critic: negative.", sentiment="negative"),
    *(Instruction(f"always mention the {word}.", f"mention {word}.", contains=word) for word in KEYWORDS),
    *(Instruction(f"answer in at most {n} words.", f"max {n} words.", max_words=n) for n in WORD_LIMITS),
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@lru_cache(maxsize=4)
def _corpus(split: str, seed: int) -> dict[str | None, tuple[str, ...]]:
    """The reviews replies are cut from (the sentiment task's train or test split): all of them
    under None, and by the sentiment their generator meant under "positive" and "negative"."""
    rows = [
        (" ".join(row["review"].split()), row["sentiment"]) for row in builtin_sentiment.load_rows(split, seed=seed)
    ]
    return {
        None: tuple(text for text, _ in rows),
        **{label: tuple(text for text, meant in rows if meant == label) for label in ("positive", "negative")},
    }


def _cut(review: str, rng: random.Random) -> tuple[str, list[str]]:
    """(a 2-8 word prefix, the sentences of the rest): a prompt and the reply that continues it."""
    words = review.split()
    k = rng.randint(2, min(8, len(words) - 1))
    return " ".join(words[:k]), _SENTENCE_END.split(" ".join(words[k:]))


def _reply(sentences: list[str], instruction: Combined | None) -> str | None:
    """The continuation, shaped to follow the instruction, or None when this review cannot."""
    if instruction is None:
        return " ".join(sentences)
    parts = {kind: part for part in instruction.parts for kind in part.kinds}
    keyword = parts["contains"].contains if "contains" in parts else None
    extra = KEYWORD_SENTENCE.format(word=keyword) if keyword else ""
    if "max_words" in parts:
        budget = parts["max_words"].max_words - len(extra.split())
        kept: list[str] = []
        for sentence in sentences:
            if len(" ".join([*kept, sentence]).split()) > budget:
                break
            kept.append(sentence)
        sentences = kept
    reply = " ".join([*sentences, extra]).strip()
    if not reply or not instruction.follows(reply):
        return None
    if "sentiment" in parts and abs(sentiment_score(reply)) < CLEAR_SENTIMENT:
        return None
    return reply


def _turn(corpus: dict, rng: random.Random, instruction: Combined | None) -> tuple[str, str]:
    """(user prefix, reply) from the first drawn review whose continuation can follow the instruction.

    A persona's reply comes from a review written with its sentiment and is clearly of it (VADER's
    score at least CLEAR_SENTIMENT from 0), not a mixed review that VADER happens to lean on the
    right side of; and its prompt is neutral ("this remake is so pathetic" would give the sentiment
    away). Otherwise a model learns the sentiment from the prompt and never looks at the persona.
    """
    persona = next((p.sentiment for p in instruction.parts if p.sentiment), None) if instruction else None
    reviews = corpus[persona]
    for _ in range(1000):
        prefix, sentences = _cut(reviews[rng.randrange(len(reviews))], rng)
        if persona and sentiment_score(prefix) != 0:  # the sentiment must come from the persona, not the prompt
            continue
        reply = _reply(sentences, instruction)
        if reply:
            return prefix, reply
    raise RuntimeError(f"no review of the corpus can follow {instruction}")  # not reached with INSTRUCTIONS


def _wording(instruction: Combined, rng: random.Random) -> str:
    return instruction.text(short=rng.random() < SHORT_WORDING_RATE)


def sft_dialogue(corpus: dict, rng: random.Random) -> list[dict]:
    """One SFT dialogue as messages: each instruction governs the one reply that follows it."""
    turns = rng.choices(list(TURN_WEIGHTS), weights=list(TURN_WEIGHTS.values()))[0]
    messages: list[dict] = []
    system = combine(INSTRUCTIONS, rng, *COMBINE) if rng.random() < SYSTEM_INSTRUCTION_RATE else None
    if system is not None:
        messages.append({"role": "system", "content": _wording(system, rng)})
    for k in range(turns):
        own = None
        if not (k == 0 and system is not None) and rng.random() < USER_INSTRUCTION_RATE:
            own = combine(INSTRUCTIONS, rng, *COMBINE)
        governing = own if own is not None else (system if k == 0 else None)
        prefix, reply = _turn(corpus, rng, governing)
        user = with_instruction(_wording(own, rng), prefix) if own is not None else prefix
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages


def plain_dialogue(pieces: list[tuple[str, str]]) -> list[dict]:
    messages: list[dict] = []
    for prefix, rest in pieces:
        messages += [{"role": "user", "content": prefix}, {"role": "assistant", "content": rest.strip()}]
    return messages


def load_rows(split: str, n: int | None = None, seed: int = 0) -> list[dict]:
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r} for builtin:dialogues; valid splits: {list(SPLIT_SIZES)}")
    n = SPLIT_SIZES[split] if n is None else n
    if split in ("train", "test"):
        corpus = _corpus(split, seed)
        rows = [sft_dialogue(corpus, random.Random(f"{seed}/dialogues/{split}:{i}")) for i in range(n)]
    elif split == "gatt":
        corpus = _corpus("train", seed)[None]
        rng = random.Random(f"{seed}/dialogues/gatt")
        rows = [
            plain_dialogue([_plain_turn(corpus, rng) for _ in range(PLAIN_TURNS)]) for _ in range(n)
        ]  # one RNG: row i still depends only on rows before it, so the first k rows of n are the k rows
    else:  # heldout: prompts that begin no training review, with their reviews' own continuations
        pieces = builtin_sentiment.heldout_prompts_with_references(n * PLAIN_TURNS, seed=seed)
        rows = [plain_dialogue(pieces[i * PLAIN_TURNS : (i + 1) * PLAIN_TURNS]) for i in range(n)]
    return [{"id": f"dialogues-{split}-{seed}-{i}", "messages": messages} for i, messages in enumerate(rows)]


def _plain_turn(corpus: tuple[str, ...], rng: random.Random) -> tuple[str, str]:
    prefix, sentences = _cut(corpus[rng.randrange(len(corpus))], rng)
    return prefix, " ".join(sentences)
