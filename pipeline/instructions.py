"""Instructions a chat model must keep for a whole conversation, and the code that checks a reply.

Ghost Attention (Llama 2, Sec. 3.3) is measured by whether a reply at turn k still follows an
instruction given at turn 1. An instruction here is a text (and an optional short wording) plus the
checks that decide whether a reply follows it, each a pure function of the reply's text:

- `sentiment`: "positive" or "negative", the sign of VADER's compound score (the task's gold reward);
- `contains`: a word the reply must contain (whole word, any case);
- `max_words`: the most words the reply may have.

An instruction without checks is allowed (a user's free-text persona): it is used to build GAtt
data, and its adherence is reported as unknown rather than guessed. Instructions are combined at
random (Llama 2: "we also combine constraints"), never two that check the same thing.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

CHECK_KINDS = ("sentiment", "contains", "max_words")


@dataclass(frozen=True)
class Instruction:
    text: str
    short: str | None = None  # a shorter wording of the same instruction
    sentiment: str | None = None  # "positive" | "negative"
    contains: str | None = None
    max_words: int | None = None

    @property
    def kinds(self) -> frozenset[str]:
        """The checks this instruction makes; an unchecked one is a kind of its own (its text)."""
        found = frozenset(kind for kind in CHECK_KINDS if getattr(self, kind) is not None)
        return found or frozenset({f"text:{self.text}"})

    @property
    def checked(self) -> bool:
        return any(getattr(self, kind) is not None for kind in CHECK_KINDS)


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment_score(text: str) -> float:
    """VADER's compound score of the text, in [-1, 1]."""
    return _vader().polarity_scores(text)["compound"]


def sentiment_sign(text: str) -> int:
    """+1, -1 or 0: the sign of VADER's compound score of the text."""
    score = sentiment_score(text)
    return (score > 0) - (score < 0)


def check_reply(instruction: Instruction, reply: str) -> dict[str, bool]:
    """Each check of the instruction -> whether the reply passes it (empty for an unchecked instruction)."""
    results: dict[str, bool] = {}
    if instruction.sentiment is not None:
        wanted = 1 if instruction.sentiment == "positive" else -1
        results["sentiment"] = sentiment_sign(reply) == wanted
    if instruction.contains is not None:
        results["contains"] = re.search(rf"\b{re.escape(instruction.contains)}\b", reply, re.IGNORECASE) is not None
    if instruction.max_words is not None:  # an empty reply keeps no length limit: it says nothing
        results["max_words"] = 0 < len(reply.split()) <= instruction.max_words
    return results


@dataclass(frozen=True)
class Combined:
    """Instructions given together: one text, and a reply follows it when it passes every check."""

    parts: tuple[Instruction, ...]

    def text(self, short: bool = False) -> str:
        return " ".join((part.short or part.text) if short else part.text for part in self.parts)

    @property
    def checked(self) -> bool:
        return any(part.checked for part in self.parts)

    def check(self, reply: str) -> dict[str, bool]:
        """Each check -> pass, over all parts (their kinds never overlap)."""
        results: dict[str, bool] = {}
        for part in self.parts:
            results.update(check_reply(part, reply))
        return results

    def follows(self, reply: str) -> bool | None:
        """Whether the reply passes every check; None when nothing can be checked."""
        results = self.check(reply)
        return all(results.values()) if results else None


def combine(instructions: Sequence[Instruction], rng: random.Random, lo: int, hi: int) -> Combined:
    """Between lo and hi instructions drawn at random, no two checking the same thing.

    Instructions are grouped by what they check, a number of groups is drawn, then one instruction
    from each group: so a persona is as likely as a keyword even when there are 2 personas and 8
    keywords. With fewer groups than asked for, as many as there are.
    """
    groups: dict[frozenset[str], list[Instruction]] = {}
    for instruction in instructions:
        groups.setdefault(instruction.kinds, []).append(instruction)
    keys = list(groups)
    k = min(rng.randint(lo, hi), len(keys))
    order = rng.sample(keys, len(keys))
    chosen: list[Instruction] = []
    used: set[str] = set()
    for key in order:
        if len(chosen) == k:
            break
        if key & used:  # an instruction checking two things overlaps a group already chosen
            continue
        chosen.append(rng.choice(groups[key]))
        used |= key
    return Combined(tuple(chosen))


def with_instruction(instruction_text: str, message: str) -> str:
    """A user message with the instruction written before it (GAtt's step 2, and per-turn instructions)."""
    return f"{instruction_text}\n{message}"
