"""Gold reward functions: the ground truth that RLHF and DPO are both measured against.

The DPO paper's sentiment experiment needs a reward that neither method trains on, so that reward
bought per unit of KL can be compared honestly. VADER (Hutto & Gilbert, 2014) fits offline: it is
published, external to this project (a lexicon and rules shipped inside the `vaderSentiment`
package, no download), and deterministic, so two runs score the same text the same way.

A gold reward scores the completion only: the caller passes the completion text, not prompt plus
completion, so a prompt's own sentiment cannot earn or cost the policy anything.
"""

from __future__ import annotations

from collections.abc import Callable

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer


class VaderGold:
    """VADER's compound score in [-1, 1]; the analyzer is built once because it parses its lexicon."""

    name = "vader"

    def __init__(self) -> None:
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: list[str]) -> list[float]:
        return [self._analyzer.polarity_scores(text)["compound"] for text in texts]


GOLD_REWARDS: dict[str, Callable[[], Callable[[list[str]], list[float]]]] = {"vader": VaderGold}


def gold_reward(name: str) -> Callable[[list[str]], list[float]]:
    if name not in GOLD_REWARDS:
        raise ValueError(f"unknown gold reward {name!r}; known: {sorted(GOLD_REWARDS)}")
    return GOLD_REWARDS[name]()
