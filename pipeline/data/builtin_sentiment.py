"""`builtin:sentiment`: short movie reviews generated offline, for the DPO paper's IMDb experiment.

The DPO paper's controlled-sentiment task needs reviews whose prefixes are prompts and whose
sentiment a gold reward can judge. IMDb cannot be downloaded everywhere, and a tiny model trained
for minutes on two CPU cores cannot learn its vocabulary, so this module writes reviews from a small
grammar instead: openers, aspects judged with adjectives of graded strength, negation ("not bad at
all"), contrast ("the cast is great but the plot drags"), intensifiers and neutral filler. Negation
and contrast make sentiment depend on word order, not on a bag of words, so the task is not trivial.

Rows use the IMDb CSV's columns (`review`, `sentiment`) so the "reviews" format adapter reads both.
`sentiment` is the label the generator meant; the gold reward is VADER's score, not this label.

Every row is drawn from its own RNG seeded by a string (seed, split, row index): output does not
depend on hash randomization or global random state, and the first k rows of n are the k rows.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from functools import lru_cache

SPLIT_SIZES = {"train": 20000, "test": 2000}
LABELS = ("positive", "negative", "neutral")
# VADER's lexicon misses more of the negative phrasings ("went nowhere") than of the positive ones;
# slightly more negative reviews bring the corpus's mean gold reward back to about 0.
LABEL_WEIGHTS = (0.38, 0.42, 0.2)

# A film is named either by a set phrase or by determiner + descriptor + genre: the hundreds of
# combinations keep 6-8 word openers varied enough that the test split has openers of its own.
SET_FILMS = ("the director's new one", "the remake", "the sequel", "the new one", "the latest one", "this one")
DETERMINERS = ("this", "the", "that")
DESCRIPTORS = (
    "",
    "",
    "",
    "new",
    "old",
    "french",
    "british",
    "korean",
    "japanese",
    "italian",
    "german",
    "spanish",
    "animated",
    "silent",
    "independent",
    "recent",
    "latest",
    "summer",
    "canadian",
    "three hour",
    "two hour",
)
GENRES = (
    "movie",
    "film",
    "thriller",
    "drama",
    "monster movie",
    "western",
    "musical",
    "heist movie",
    "biopic",
    "adaptation",
    "detective story",
    "space movie",
    "road movie",
    "family film",
    "cartoon",
    "spy movie",
    "documentary",
    "sports drama",
    "period piece",
    "sequel",
    "remake",
)
WHEN = (
    "last weekend",
    "last night",
    "yesterday",
    "on a plane",
    "on a sunday afternoon",
    "at the cinema",
    "on a tuesday",
    "at my cousin's house",
    "after work",
    "over the weekend",
    "at the local theater",
    "on a long flight",
    "this morning",
    "on tv",
    "on a friday night",
    "on a train",
)
COMPANY = (
    "with my brother",
    "with my sister",
    "with my wife",
    "with my husband",
    "with my kids",
    "with a coworker",
    "with my parents",
    "with my roommate",
    "by myself",
    "with my girlfriend",
    "with my boyfriend",
    "with my cousins",
    "with my dad",
    "with my mom",
    "with my class",
)
OPENERS = (
    "i watched {film} {when}.",
    "i saw {film} {company}.",
    "i saw {film} {when} {company}.",
    "we rented {film} {when}.",
    "so i finally saw {film}.",
    "i went to see {film} {when}.",
    "i caught {film} {when}.",
    "my {person} talked me into seeing {film}.",
    "i had heard a lot about {film}.",
    "{film} came out {ago}.",
    "i went into {film} knowing nothing about it.",
    "i watched {film} {company}.",
    "we saw {film} {when}.",
    "i finally got around to {film}.",
    "i rented {film} {company}.",
)
PEOPLE = (
    "brother",
    "sister",
    "wife",
    "husband",
    "cousin",
    "neighbor",
    "roommate",
    "dad",
    "mom",
    "girlfriend",
    "boyfriend",
)
AGO = ("last year", "a few weeks ago", "this summer", "back in the nineties", "two years ago", "last month")
FILLERS = (
    "it runs about two hours.",
    "it runs about ninety minutes.",
    "i saw it on a tuesday.",
    "it came out last year.",
    "it is based on a book.",
    "the theater was half full.",
    "the director also wrote the script.",
    "it was filmed in canada.",
    "there is an extra scene at the end.",
    "my brother had already seen it.",
    "it is the second film in the series.",
    "we had popcorn.",
    "most of it takes place on a boat.",
    "the story is set in the nineties.",
    "it is in black and white.",
    "the trailer shows most of the plot.",
    "i read the book first.",
    "it was shot in about a month.",
    "the lead actor is from france.",
    "it has four songs in it.",
    "it is mostly set in one house.",
    "i went in knowing only the title.",
    "the story follows two brothers.",
    "it is about a family on a farm.",
    "it starts in a small town.",
    "the whole thing takes place in one night.",
)

# (phrase, plural, kind): kind picks which extra adjectives fit the aspect.
ASPECTS = (
    ("the acting", False, "craft"),
    ("the plot", False, "story"),
    ("the pacing", False, "story"),
    ("the soundtrack", False, "craft"),
    ("the music", False, "craft"),
    ("the cast", False, "craft"),
    ("the ending", False, "story"),
    ("the dialogue", False, "story"),
    ("the effects", True, "craft"),
    ("the cinematography", False, "craft"),
    ("the script", False, "story"),
    ("the story", False, "story"),
    ("the characters", True, "story"),
    ("the lead actor", False, "craft"),
    ("the villain", False, "story"),
    ("the jokes", True, "story"),
    ("the action scenes", True, "craft"),
    ("the costumes", True, "craft"),
    ("the camera work", False, "craft"),
    ("the editing", False, "craft"),
    ("the writing", False, "story"),
    ("the direction", False, "craft"),
    ("the performances", True, "craft"),
    ("the first half", False, "story"),
    ("the last act", False, "story"),
    ("the twist", False, "story"),
    ("the humor", False, "story"),
    ("the visuals", True, "craft"),
    ("the score", False, "craft"),
    ("the sets", True, "craft"),
)
# ADJECTIVES[polarity][strength]; KIND_ADJECTIVES[polarity][kind] are mild ones that fit one kind.
ADJECTIVES = {
    1: {
        "mild": (
            "decent",
            "nice",
            "fine",
            "good",
            "solid",
            "pleasant",
            "fun",
            "charming",
            "sweet",
            "watchable",
            "entertaining",
            "engaging",
            "fresh",
            "warm",
            "lively",
        ),
        "strong": (
            "great",
            "superb",
            "excellent",
            "wonderful",
            "brilliant",
            "fantastic",
            "amazing",
            "beautiful",
            "outstanding",
            "perfect",
            "stunning",
            "lovely",
            "impressive",
            "exciting",
        ),
    },
    -1: {
        "mild": (
            "weak",
            "dull",
            "boring",
            "bland",
            "flat",
            "messy",
            "slow",
            "forgettable",
            "tedious",
            "clumsy",
            "awkward",
            "lazy",
            "uneven",
            "forced",
        ),
        "strong": (
            "awful",
            "terrible",
            "horrible",
            "bad",
            "dreadful",
            "painful",
            "stupid",
            "pathetic",
            "dumb",
            "lame",
            "poor",
            "annoying",
            "disappointing",
        ),
    },
}
KIND_ADJECTIVES = {
    1: {
        "story": ("gripping", "clever", "moving", "original", "tight", "funny"),
        "craft": ("convincing", "polished", "gorgeous", "natural", "striking"),
    },
    -1: {
        "story": ("predictable", "confusing", "thin", "cliched", "pointless"),
        "craft": ("wooden", "cheap", "sloppy", "amateurish", "ugly"),
    },
}
INTENSIFIERS = {
    "mild": ("", "", "", "quite ", "fairly ", "a bit ", "kind of ", "somewhat "),
    "strong": ("", "really ", "incredibly ", "very ", "truly ", "absolutely ", "so ", "extremely "),
}
# Polarity said through negation: the adjective's own polarity is the opposite.
NEGATED = {
    1: (
        "not bad",
        "not bad at all",
        "never boring",
        "not boring for a second",
        "not as bad as people say",
        "not weak at all",
        "not dull for a minute",
    ),
    -1: (
        "not good",
        "not great",
        "not very good",
        "not funny at all",
        "not as good as the first one",
        "not interesting at all",
        "not exciting",
        "not good enough",
    ),
}
VERB_PHRASES = {
    1: (
        "kept me hooked",
        "made me smile",
        "made me laugh",
        "carried the whole film",
        "won me over",
        "grabbed me from the start",
        "really paid off",
        "surprised me",
        "blew me away",
        "stayed with me for days",
        "worked really well",
        "held my attention",
    ),
    -1: (
        "dragged on forever",
        "fell apart",
        "went nowhere",
        "made no sense",
        "put me to sleep",
        "felt forced",
        "lost me halfway through",
        "never came together",
        "got on my nerves",
        "ruined it for me",
        "let me down",
        "bored me to tears",
        "fell flat",
        "was a total mess",
        "made me cringe",
    ),
}
FIRST_PERSON = {
    1: ("i loved {a}", "i really liked {a}", "i enjoyed {a}", "i was impressed by {a}", "i liked {a} a lot"),
    -1: (
        "i hated {a}",
        "i did not like {a}",
        "i did not care for {a}",
        "i could not stand {a}",
        "i was disappointed by {a}",
        "i did not enjoy {a}",
    ),
}
VERDICTS = {
    1: (
        "i really enjoyed it.",
        "highly recommended.",
        "well worth watching.",
        "i would watch it again.",
        "not bad at all for a {kind}.",
        "one of the best films i have seen this year.",
        "go see it.",
        "i loved every minute of it.",
        "my whole family loved it.",
        "a great time at the movies.",
        "i would recommend it to anyone.",
        "it was not a waste of time at all.",
        "definitely worth a look.",
        "i was pleasantly surprised.",
    ),
    -1: (
        "a waste of time.",
        "i did not enjoy it.",
        "i want my two hours back.",
        "skip this one.",
        "not worth your time.",
        "one of the worst films i have seen.",
        "i was bored the whole time.",
        "avoid it.",
        "i would not recommend it.",
        "not good at all.",
        "what a letdown.",
        "i expected more.",
        "i almost walked out.",
        "what a disappointment.",
        "i regret watching it.",
    ),
    0: (
        "it was okay i guess.",
        "an average film.",
        "nothing special.",
        "not great, not terrible.",
        "i have mixed feelings about it.",
        "some of it works and some of it does not.",
        "it is fine for a rainy day.",
        "worth a look if you have nothing else to watch.",
        "it is neither good nor bad.",
        "your mileage may vary.",
    ),
}
KINDS = ("sequel", "remake", "comedy", "first film", "cheap film", "kids movie", "tv movie")
PROPER_NOUNS = {
    w.lower(): w
    for w in (
        "I",
        "Sunday",
        "Tuesday",
        "Friday",
        "Canada",
        "France",
        "French",
        "British",
        "Korean",
        "Japanese",
        "Italian",
        "German",
        "Spanish",
        "Canadian",
    )
}
CONTRACTIONS = (
    ("did not", "didn't"),
    ("is not", "isn't"),
    ("was not", "wasn't"),
    ("could not", "couldn't"),
    ("would not", "wouldn't"),
    ("does not", "doesn't"),
    ("are not", "aren't"),
    ("were not", "weren't"),
)


def _film(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return rng.choice(SET_FILMS)
    words = (rng.choice(DETERMINERS), rng.choice(DESCRIPTORS), rng.choice(GENRES))
    return " ".join(w for w in words if w)


class _Slots(dict):
    """Fills a template's slots on demand: drawing only the slots it has keeps generation fast."""

    def __init__(self, rng: random.Random):
        super().__init__()
        self.rng = rng

    def __missing__(self, slot: str) -> str:
        return _film(self.rng) if slot == "film" else self.rng.choice(SLOT_WORDS[slot])


SLOT_WORDS = {"when": WHEN, "company": COMPANY, "person": PEOPLE, "ago": AGO}


def _opener(rng: random.Random) -> str:
    return rng.choice(OPENERS).format_map(_Slots(rng))


def _adjective(rng: random.Random, polarity: int, kind: str) -> str:
    """An adjective of `polarity`, strong or mild, with an intensifier that matches its strength."""
    if rng.random() < 0.2:
        return rng.choice(INTENSIFIERS["mild"]) + rng.choice(KIND_ADJECTIVES[polarity][kind])
    strength = rng.choice(("mild", "strong"))
    return rng.choice(INTENSIFIERS[strength]) + rng.choice(ADJECTIVES[polarity][strength])


def _clause(rng: random.Random, polarity: int) -> str:
    """One judgement of one aspect, said in one of several ways (plain, negated, verb, first person)."""
    aspect, plural, kind = rng.choice(ASPECTS)
    be = rng.choice(("are", "were") if plural else ("is", "was"))
    shape = rng.random()
    if shape < 0.4:
        return f"{aspect} {be} {_adjective(rng, polarity, kind)}"
    if shape < 0.6:
        return f"{aspect} {be} {rng.choice(NEGATED[polarity])}"
    if shape < 0.8:
        return f"{aspect} {rng.choice(VERB_PHRASES[polarity])}"
    return rng.choice(FIRST_PERSON[polarity]).format(a=aspect)


def _contrast(rng: random.Random, polarity: int) -> str:
    """Two clauses of opposite polarity joined by "but": the second one carries the sentence."""
    return f"{_clause(rng, -polarity)} but {_clause(rng, polarity)}."


def _body_sentence(rng: random.Random, polarity: int) -> str:
    roll = rng.random()
    if roll < 0.25:
        return _contrast(rng, polarity)
    if roll < 0.4:
        return f"{_clause(rng, polarity)} and {_clause(rng, polarity)}."
    if roll < 0.45:
        return f"{_clause(rng, polarity)}!"
    return f"{_clause(rng, polarity)}."


def _film_sentence(rng: random.Random, polarity: int) -> str:
    """A verdict on the whole film opening the review, instead of a neutral opener."""
    return f"{_film(rng)} is {_adjective(rng, polarity, rng.choice(('story', 'craft')))}."


def _verdict(rng: random.Random, polarity: int) -> str:
    return rng.choice(VERDICTS[polarity]).format(kind=rng.choice(KINDS))


def _opinionated(rng: random.Random, polarity: int) -> list[str]:
    sentences = [_opener(rng) if rng.random() < 0.9 else _film_sentence(rng, polarity)]
    sentences += [_body_sentence(rng, polarity) for _ in range(rng.choice((1, 1, 2)))]
    if rng.random() < 0.3:
        sentences.insert(rng.randint(1, len(sentences)), rng.choice(FILLERS))
    if len(sentences) < 4 and rng.random() < 0.6:
        sentences.append(_verdict(rng, polarity))
    return sentences


def _pad(rng: random.Random, sentences: list[str]) -> list[str]:
    """Adds a filler after the opener to a review under 15 words: one-line reviews teach little."""
    if sum(len(s.split()) for s in sentences) < 15:
        sentences.insert(1, rng.choice(FILLERS))
    return sentences


def _neutral(rng: random.Random) -> list[str]:
    """Mixed or flat reviews: both sides of a contrast, or only facts, ending on a shrug."""
    sentences = [_opener(rng)]
    roll = rng.random()
    if roll < 0.4:
        sentences.append(_contrast(rng, rng.choice((1, -1))))
    elif roll < 0.7:
        sides = [f"{_clause(rng, 1)}.", f"{_clause(rng, -1)}."]
        rng.shuffle(sides)
        sentences += sides
    else:
        sentences += rng.sample(FILLERS, 2)
    return sentences + [_verdict(rng, 0)]


def _style(rng: random.Random, text: str) -> str:
    """Contractions and normal casing on some reviews, so the model sees both styles of writing."""
    if rng.random() < 0.3:
        for long, short in CONTRACTIONS:
            text = text.replace(f"{long} ", f"{short} ")
    if rng.random() < 0.25:
        text = re.sub(r"(^|[.!] )([a-z])", lambda m: m[1] + m[2].upper(), text)
        text = " ".join(PROPER_NOUNS.get(w, w) for w in text.split(" "))
    return text


def _review(stream: str, index: int) -> tuple[str, str]:
    rng = random.Random(f"{stream}:{index}")
    label = rng.choices(LABELS, LABEL_WEIGHTS)[0]
    sentences = _neutral(rng) if label == "neutral" else _opinionated(rng, 1 if label == "positive" else -1)
    return _style(rng, " ".join(_pad(rng, sentences))), label


def _rows(stream: str, n: int, id_prefix: str) -> list[dict]:
    rows = []
    for i in range(n):
        review, label = _review(stream, i)
        rows.append({"id": f"{id_prefix}-{i}", "review": review, "sentiment": label})
    return rows


def generate_reviews(n: int, seed: int) -> list[dict]:
    """n reviews; row i depends only on (seed, i), so shorter outputs are prefixes of longer ones."""
    return _rows(str(seed), n, f"s{seed}")


def _stream(split: str, seed: int) -> str:
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r} for builtin:sentiment; valid splits: {sorted(SPLIT_SIZES)}")
    return f"{seed}/{split}"


def load_rows(split: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """The train or test split, each from its own seed stream so that the two hold different reviews."""
    return _rows(_stream(split, seed), SPLIT_SIZES[split] if n is None else n, f"{split}-{seed}")


def review_prefix(review: str, n_words: int) -> str:
    return " ".join(review.split()[:n_words])


def _prompt(stream: str, index: int, min_words: int, max_words: int) -> str:
    """The prefix of review `index`, its length drawn from an RNG of its own (not the review's)."""
    n_words = random.Random(f"{stream}:prompt:{index}").randint(min_words, max_words)
    return review_prefix(_review(stream, index)[0], n_words)


def _distinct(prompts: Iterable[str], n: int, what: str) -> list[str]:
    found: dict[str, None] = {}  # an ordered set: prompts keep the order of their reviews
    for prompt in prompts:
        if len(found) >= n:
            break
        found.setdefault(prompt)
    if len(found) < n:
        raise ValueError(f"only {len(found)} distinct {what} could be found, not {n}")
    return list(found)


def train_prompts(n: int, seed: int = 0, min_words: int = 2, max_words: int = 8) -> list[str]:
    """Distinct prefixes of the train split's reviews, one drawn per review, in review order.

    They come from the train split's `SPLIT_SIZES["train"]` reviews only, the reviews whose every
    prefix `heldout_prompts` avoids; asking for more distinct prompts than they hold is an error.
    """
    stream = _stream("train", seed)
    prompts = (_prompt(stream, i, min_words, max_words) for i in range(SPLIT_SIZES["train"]))
    return _distinct(prompts, n, f"train prompts of {min_words}-{max_words} words")


@lru_cache(maxsize=4)
def _train_prefixes(seed: int, min_words: int, max_words: int) -> frozenset[str]:
    """Every prefix of every train review, so no train review (hence no train prompt) starts a heldout one."""
    prefixes = set()
    for row in load_rows("train", seed=seed):
        words = row["review"].split()
        prefixes.update(" ".join(words[:k]) for k in range(min_words, max_words + 1))
    return frozenset(prefixes)


def heldout_prompts(n: int, seed: int = 0, min_words: int = 2, max_words: int = 8) -> list[str]:
    """Distinct prefixes of test reviews that begin no train review, read from as many as it takes.

    Short prefixes ("i watched the new one") begin many train reviews and are skipped, so heldout
    prompts are longer on average than train prompts: the price of openings that are truly unseen.
    """
    return [prompt for prompt, _ in heldout_prompts_with_references(n, seed, min_words, max_words)]


def heldout_prompts_with_references(
    n: int, seed: int = 0, min_words: int = 2, max_words: int = 8
) -> list[tuple[str, str]]:
    """`heldout_prompts` with the rest of each prompt's review: the dataset's own completion."""
    stream, excluded = _stream("test", seed), _train_prefixes(seed, min_words, max_words)
    found: dict[str, str] = {}
    for index in range(50 * n + SPLIT_SIZES["test"]):
        if len(found) >= n:
            break
        prompt = _prompt(stream, index, min_words, max_words)
        if prompt not in excluded and prompt not in found:
            review = " ".join(_review(stream, index)[0].split())
            found[prompt] = review[len(prompt) :]
    if len(found) < n:
        raise ValueError(
            f"only {len(found)} distinct heldout prompts of {min_words}-{max_words} words could be found, not {n}"
        )
    return list(found.items())
