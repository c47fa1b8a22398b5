"""The records every stage reads, and the ledger of rows dropped on the way to them.

A format adapter turns one raw row into one record or raises `Drop` with a reason from
`DROP_REASONS`; `DropLedger` counts those reasons so that no row disappears without a trace.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pipeline.errors import DataError

Segment = tuple[str, bool]  # a piece of a rendered conversation and whether the loss is on it


@dataclass(frozen=True)
class SFTExample:
    """A prompt and the response to learn. `prompt == ""` means plain text: every token is trained.

    `finished` is False for a response cut short (sampled up to a token limit): it gets no EOS, so
    the model is never taught to stop where the text was only cut.

    A multi-turn conversation also holds `segments`: the rendered conversation cut into pieces,
    each marked trained (an assistant reply with its end of turn) or not (system and user turns,
    template markup). Then `prompt` is the first piece and `response` the rest, joined.
    """

    prompt: str
    response: str
    source_id: str
    finished: bool = True
    segments: tuple[Segment, ...] = field(default=(), compare=False)

    @classmethod
    def conversation(cls, segments: tuple[Segment, ...], source_id: str) -> SFTExample:
        return cls(segments[0][0], "".join(text for text, _ in segments[1:]), source_id, segments=segments)


@dataclass(frozen=True)
class PreferencePair:
    """Two responses to one prompt, `chosen` preferred over `rejected`.

    `rating` names a preference strength level (Llama 2: "significantly better" ...) and `margin` is
    a numeric gap (e.g. the gold-reward difference); either feeds the reward model's margin loss.
    `chosen_finished` / `rejected_finished` say whether each response ended (EOS) or was cut at a
    token limit when it was sampled; a dataset without those columns holds whole responses.
    `context` is the conversation before the responses, as messages, when the format has it.
    """

    prompt: str
    chosen: str
    rejected: str
    source_id: str
    rating: str | None = None
    margin: float | None = None
    chosen_finished: bool = True
    rejected_finished: bool = True
    context: tuple[dict, ...] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class PromptRecord:
    """A prompt to sample from (PPO rollouts, evaluation), with the dataset's own completion if any."""

    prompt: str
    source_id: str
    reference: str | None = None
    unsafe: bool = False  # flagged as adversarial/unsafe (Llama 2 then scores with the safety model)
    # The conversation the prompt renders, for chat formats: a reward model with another chat
    # template renders it again with its own.
    messages: tuple[dict, ...] | None = field(default=None, compare=False)


DROP_REASONS = (
    "missing field",
    "empty response",
    "chosen equals rejected",
    "differing context",
    "template mismatch",
    "prompt too long",
    "below score ratio",
    "tie",
)


class Drop(Exception):
    """Raised by an adapter for a row it cannot use; `reason` is one of DROP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in DROP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DropLedger:
    """Counts kept and dropped rows per source and reason; in strict mode the first drop is an error."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.kept: Counter[str] = Counter()
        self.dropped: Counter[tuple[str, str]] = Counter()

    def keep(self, source: str, n: int = 1) -> None:
        self.kept[source] += n

    def drop(self, source: str, row_id: str, drop: Drop) -> None:
        if self.strict:
            raise DataError(f"{source}: row {row_id} dropped ({drop}); data.strict is true")
        self.dropped[(source, drop.reason)] += 1

    def reasons(self, source: str | None = None) -> dict[str, int]:
        """Dropped counts by reason, for one source or summed over all of them."""
        out: Counter[str] = Counter()
        for (src, reason), n in self.dropped.items():
            if source is None or src == source:
                out[reason] += n
        return dict(out)

    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary_lines(self) -> list[str]:
        lines = []
        for source in sorted(set(self.kept) | {s for s, _ in self.dropped}):
            reasons = self.reasons(source)
            detail = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) or "none"
            lines.append(f"{source}: kept {self.kept[source]}, dropped {sum(reasons.values())} ({detail})")
        return lines
