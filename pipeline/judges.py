"""Gold reward functions: the ground truth that RLHF and DPO are both measured against.

The DPO paper's sentiment experiment needs a reward that neither method trains on, so that reward
bought per unit of KL can be compared honestly. VADER (Hutto & Gilbert, 2014) fits offline: it is
published, external to this project (a lexicon and rules shipped inside the `vaderSentiment`
package, no download), and deterministic, so two runs score the same text the same way.

A gold reward scores the completion only: the caller passes the completion text, not prompt plus
completion, so a prompt's own sentiment cannot earn or cost the policy anything.

On a GPU machine with the hub in reach, `hf:<model id>` names a sentiment classifier loaded through
transformers' `pipeline` (the DPO paper used `siebert/sentiment-roberta-large-english`); its score
is P(positive) - P(negative), in [-1, 1] like VADER's. Where the classifier cannot be loaded, the
run says so and falls back to VADER rather than stopping.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer


class VaderGold:
    """VADER's compound score in [-1, 1]; the analyzer is built once because it parses its lexicon."""

    name = "vader"

    def __init__(self) -> None:
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: list[str]) -> list[float]:
        return [self._analyzer.polarity_scores(text)["compound"] for text in texts]


class ClassifierGold:
    """A Hugging Face sentiment classifier: P(positive) - P(negative) of each text."""

    def __init__(self, model_id: str, batch_size: int = 64) -> None:
        from transformers import pipeline

        self.name = f"hf:{model_id}"
        self.batch_size = batch_size
        self._classify = pipeline("text-classification", model=model_id, top_k=None, truncation=True)

    def __call__(self, texts: list[str]) -> list[float]:
        scores = []
        for labels in self._classify(texts, batch_size=self.batch_size):
            probability = {item["label"].lower(): item["score"] for item in labels}
            scores.append(probability.get("positive", 0.0) - probability.get("negative", 0.0))
        return scores


GOLD_REWARDS: dict[str, Callable[[], Callable[[list[str]], list[float]]]] = {"vader": VaderGold}
CLASSIFIER_PREFIX = "hf:"


def is_known_gold(name: str) -> bool:
    return name in GOLD_REWARDS or (name.startswith(CLASSIFIER_PREFIX) and len(name) > len(CLASSIFIER_PREFIX))


def gold_reward(name: str) -> Callable[[list[str]], list[float]]:
    if name.startswith(CLASSIFIER_PREFIX):
        try:
            return ClassifierGold(name[len(CLASSIFIER_PREFIX) :])
        except OSError as err:  # no network, no cached copy
            print(
                f"gold reward {name} could not be loaded ({type(err).__name__}); using vader instead", file=sys.stderr
            )
            return VaderGold()
    if name not in GOLD_REWARDS:
        raise ValueError(f"unknown gold reward {name!r}; known: {sorted(GOLD_REWARDS)} or hf:<classifier id>")
    return GOLD_REWARDS[name]()
