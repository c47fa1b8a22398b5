"""Format adapters: one raw row in, one record out, or `Drop` with the reason it cannot be used.

Each `SourceConfig.format` has one small pure function per record it can yield. The factories at
the bottom (`sft_adapter`, `pair_adapter`, `prompt_adapter`) pick the function for a source, apply
its column remapping, and derive the records a format does not hold directly: SFT examples and
prompts from preference pairs (the chosen response is the one to imitate), prompts with
references from prompt/completion rows.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from functools import partial
from typing import Any

from pipeline.config import DEFAULT_MIN_SCORE_RATIO, DEFAULT_PROMPT_WORDS, SourceConfig
from pipeline.data.records import DataError, Drop, PreferencePair, PromptRecord, Segment, SFTExample

Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text
Record = SFTExample | PreferencePair | PromptRecord

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


# ------------------------------------------------------------------------------------ field access


def remap(row: dict, columns: dict[str, str]) -> dict:
    """The row under the adapter's column names: `columns` maps ours -> the file's.

    A mapped column the file lacks removes our name too, so the adapter reports it missing rather
    than silently reading a same-named column the user asked to replace.
    """
    out = dict(row)
    for ours, theirs in columns.items():
        if theirs in row:
            out[ours] = row[theirs]
        else:
            out.pop(ours, None)
    return out


def _text(row: dict, name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        raise Drop("missing field", f"'{name}' is {_what(row, name)}, not a string")
    return value


def _number(row: dict, name: str) -> float:
    """A numeric column; CSV files hold numbers as text, so a numeric string counts."""
    value = row.get(name)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise Drop("missing field", f"'{name}' is {_what(row, name)}, not a number")


def _optional(row: dict, name: str) -> Any:
    """None for an absent, null or empty (CSV) optional column, else its value."""
    value = row.get(name)
    return None if value is None or value == "" else value


def message_list(row: dict, name: str) -> list[dict]:
    value = row.get(name)
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise Drop("missing field", f"'{name}' is {_what(row, name)}, not a list of {{role, content}} messages")
    for i, message in enumerate(value):
        if "weight" not in message:
            continue
        if message["role"] != "assistant":
            raise Drop("missing field", f"'{name}' message {i}: 'weight' is only read on assistant messages")
        if message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
            raise Drop("missing field", f"'{name}' message {i}: 'weight' is {message['weight']!r}, not 0 or 1")
    return value


def _flag(row: dict, name: str) -> bool:
    """An optional boolean column, True when absent (a dataset's responses are whole unless it says so)."""
    value = _optional(row, name)
    if value is None:
        return True
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise Drop("missing field", f"'{name}' is {value!r}, not true or false")


def _what(row: dict, name: str) -> str:
    return "absent" if name not in row else type(row[name]).__name__


def _nonempty(text: str, name: str) -> str:
    if not text.strip():
        raise Drop("empty response", f"'{name}' is empty")
    return text


# ----------------------------------------------------------------------------------- conversations


def _rendered(render: Render, messages: list[dict], add_generation_prompt: bool) -> str:
    """The template's text; a template that refuses the conversation (roles out of order) drops the row."""
    try:
        return render(messages, add_generation_prompt)
    except Exception as err:  # jinja2's TemplateError, or whatever a template raises
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise Drop("template mismatch", f"the chat template refused the conversation: {first}") from None


def conversation_segments(messages: list[dict], render: Render) -> tuple[Segment, ...]:
    """The rendered conversation cut before and after every assistant reply: (text, trained) pieces.

    Each reply is what the template adds between the conversation before it rendered with the
    generation prompt and the conversation through it, so the loss covers the reply and its end of
    turn, in every assistant turn, and nothing the user or system wrote. An assistant message with
    `"weight": 0` (OpenAI's fine-tuning format; what `rlhfdpo data gatt` writes for earlier turns)
    is context only: its piece is not trained. The pieces join to the rendering of the whole
    conversation. A template whose rendered prompt is not a prefix of the
    rendered conversation (one that rewrites earlier turns) drops the row: no cut would be right.
    """
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _rendered(render, messages[:i], True)
        through = _rendered(render, messages[: i + 1], False)
        if not prompt.startswith(done) or not through.startswith(prompt):
            raise Drop(
                "template mismatch",
                f"the rendered prompt of assistant turn {i} is not a prefix of the rendered conversation",
            )
        segments += [(prompt[len(done) :], False), (through[len(prompt) :], message.get("weight", 1) == 1)]
        done = through
    return _with_a_reply(
        segments, "the conversation has no assistant message", "every trained assistant message is empty"
    )


def hh_messages(dialogue: str, side: str) -> list[dict]:
    """An HH-RLHF dialogue string as messages: Human -> user, Assistant -> assistant."""
    parts = _HH_TURN.split(dialogue)
    if len(parts) < 3 or parts[0].strip():
        raise Drop("missing field", f"'{side}' does not start with a '\\n\\nHuman:' turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[role], "content": text.strip()} for role, text in zip(parts[1::2], parts[2::2])]


def hh_raw_segments(dialogue: str) -> tuple[Segment, ...]:
    """An HH-RLHF dialogue as written, cut around every assistant reply (for tokenizers without a template)."""
    segments: list[Segment] = []
    done = 0
    for marker in re.finditer(re.escape(HH_ASSISTANT), dialogue):
        if marker.start() < done:  # "\n\nAssistant:" inside a reply: the reply runs to the next human turn
            continue
        end = dialogue.find(HH_HUMAN, marker.end())
        end = len(dialogue) if end < 0 else end
        segments += [(dialogue[done : marker.end()], False), (dialogue[marker.end() : end], True)]
        done = end
    return _with_a_reply(segments, "'chosen' has no '\\n\\nAssistant:' turn", "every assistant reply is empty")


def _with_a_reply(segments: list[Segment], none: str, empty: str) -> tuple[Segment, ...]:
    """The pieces of a conversation, dropped when no reply (`none`) or only empty ones (`empty`) would be trained."""
    if not segments:
        raise Drop("missing field", none)
    if not any(text.strip() for text, trained in segments if trained):
        raise Drop("empty response", empty)
    return tuple(segments)


# ------------------------------------------------------------------------------------- SFT formats


def text_example(row: dict) -> SFTExample:
    """Plain text: no prompt, every token is trained."""
    return SFTExample(prompt="", response=_nonempty(_text(row, "text"), "text"), source_id=row["_id"])


def prompt_completion_example(row: dict) -> SFTExample:
    completion = _nonempty(_text(row, "completion"), "completion")
    return SFTExample(prompt=_text(row, "prompt"), response=completion, source_id=row["_id"])


def messages_example(row: dict, render: Render) -> SFTExample:
    """OpenAI-style `messages` ({role, content}, an optional system message first): every assistant turn is trained."""
    return SFTExample.conversation(conversation_segments(message_list(row, "messages"), render), row["_id"])


def messages_prompt(row: dict, render: Render) -> PromptRecord:
    """The conversation rendered with the generation prompt; a final assistant message is left out
    and becomes the reference (a conversation ending with a user turn is a prompt as it is)."""
    messages = message_list(row, "messages")
    ends_with_reply = bool(messages) and messages[-1]["role"] == "assistant"
    context = messages[:-1] if ends_with_reply else messages
    if not context:
        raise Drop("missing field", "'messages' holds nothing to answer")
    reference = messages[-1]["content"] if ends_with_reply else None
    return PromptRecord(_rendered(render, context, True), row["_id"], reference, messages=tuple(context))


def hh_rlhf_example(row: dict, render: Render | None) -> SFTExample:
    """The chosen dialogue of an HH-RLHF row, every assistant reply trained: through the chat
    template when the tokenizer has one, else as the text was written."""
    dialogue = _text(row, "chosen")
    if render is None:
        return SFTExample.conversation(hh_raw_segments(dialogue), row["_id"])
    return SFTExample.conversation(conversation_segments(hh_messages(dialogue, "chosen"), render), row["_id"])


def chosen_conversation_example(row: dict, render: Render) -> SFTExample:
    """The chosen conversation of a conversational or UltraFeedback row, every assistant turn trained."""
    chosen = message_list(row, "chosen")
    if _optional(row, "prompt") is not None:
        chosen = message_list(row, "prompt") + chosen
    return SFTExample.conversation(conversation_segments(chosen, render), row["_id"])


def clean_review(text: str) -> str:
    """IMDb reviews keep the site's `<br />` line breaks; a model should not learn to emit them."""
    return " ".join(_HTML_BREAK.sub(" ", text).split())


def review_example(row: dict) -> SFTExample:
    """A cleaned review as plain text. Its `sentiment` label goes into no record: the gold reward
    judges the generated text itself, so the column may be absent."""
    review = _nonempty(clean_review(_text(row, "review")), "review")
    return SFTExample(prompt="", response=review, source_id=row["_id"])


def review_prompt(row: dict, words: tuple[int, int], seed: int) -> PromptRecord:
    """The first k words of a review, k drawn from `words` by an RNG seeded with the row's id.

    Seeding per row makes a prompt independent of which other rows were read, so the same review
    gives the same prefix in every run. The rest of the review, with its leading space, is the
    reference continuation: `prompt + reference` is the cleaned review. A review too short to
    leave a continuation after the shortest prefix is dropped as an empty response; a longer one
    shorter than the drawn k is cut so that at least one word remains.
    """
    review_words = _nonempty(clean_review(_text(row, "review")), "review").split(" ")
    lo, hi = words
    if len(review_words) <= lo:
        raise Drop("empty response", f"the review has {len(review_words)} words; nothing follows a {lo}-word prompt")
    k = min(random.Random(f"{seed}:{row['_id']}").randint(lo, hi), len(review_words) - 1)
    return PromptRecord(
        prompt=" ".join(review_words[:k]), source_id=row["_id"], reference=" " + " ".join(review_words[k:])
    )


# ------------------------------------------------------------------------------ preference formats


def _pair(prompt: str, chosen: str, rejected: str, row: dict, **extra: Any) -> PreferencePair:
    """The checks every preference format shares: two non-empty, different responses."""
    _nonempty(chosen, "chosen")
    _nonempty(rejected, "rejected")
    if chosen == rejected:
        raise Drop("chosen equals rejected")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, source_id=row["_id"], **extra)


def _split_hh(dialogue: str, side: str) -> tuple[str, str]:
    """(everything up to and including the last `\\n\\nAssistant:`, the reply after it)."""
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise Drop("missing field", f"'{side}' has no '\\n\\nAssistant:' turn")
    cut += len(HH_ASSISTANT)
    return dialogue[:cut], dialogue[cut:]


def hh_rlhf_pair(row: dict, render: Render | None = None) -> PreferencePair:
    """Anthropic HH-RLHF: two whole dialogues that should differ only in the last assistant reply.

    With a chat template the dialogues become messages rendered like every chat format. Without
    one they stay as written: the reply keeps its leading space (the prompt ends with "Assistant:"
    and the response begins " ..."). Some rows differ earlier: a reply that itself contains
    "\\n\\nAssistant:" (the model wrote extra turns) moves the last marker, and splitting there
    would train on a mangled prompt. Those rows are dropped as "differing context".
    """
    if render is not None:
        chosen = hh_messages(_text(row, "chosen"), "chosen")
        rejected = hh_messages(_text(row, "rejected"), "rejected")
        return _chat_pair(chosen, rejected, render, row)
    prompt, chosen = _split_hh(_text(row, "chosen"), "chosen")
    other_prompt, rejected = _split_hh(_text(row, "rejected"), "rejected")
    if prompt != other_prompt:
        raise Drop("differing context", "the dialogues differ before their last assistant turn")
    return _pair(prompt, chosen, rejected, row)


def prompt_chosen_rejected_pair(row: dict) -> PreferencePair:
    """Plain strings, with an optional numeric `margin` and a `rating` level for the margin loss.

    Optional `chosen_finished` / `rejected_finished` (what `rlhfdpo data pairs` writes) mark a
    response that was cut at the sampling limit; without them both responses are whole.
    """
    margin = _number(row, "margin") if _optional(row, "margin") is not None else None
    rating = _optional(row, "rating")
    return _pair(
        _text(row, "prompt"),
        _text(row, "chosen"),
        _text(row, "rejected"),
        row,
        margin=margin,
        rating=None if rating is None else str(rating),
        chosen_finished=_flag(row, "chosen_finished"),
        rejected_finished=_flag(row, "rejected_finished"),
    )


def _chat_pair(chosen: list[dict], rejected: list[dict], render: Render, row: dict, **extra: Any) -> PreferencePair:
    """Two message lists sharing all but a last assistant message, rendered with the chat template.

    The prompt is the shared messages rendered with the generation prompt; each response is the
    rendered full dialogue minus that prefix, so prompt + response is exactly what the template
    produces for the whole conversation.
    """
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages or messages[-1]["role"] != "assistant":
            raise Drop("missing field", f"'{side}' does not end with an assistant message")
        if not messages[-1]["content"].strip():
            raise Drop("empty response", f"'{side}' ends with an empty assistant message")
    context = chosen[:-1]
    if context != rejected[:-1]:
        raise Drop("differing context", "the conversations differ before their last assistant message")
    prompt = _rendered(render, context, True)
    responses = []
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        full = _rendered(render, messages, False)
        if not full.startswith(prompt):
            raise Drop("template mismatch", f"the rendered prompt is not a prefix of the rendered '{side}'")
        responses.append(full[len(prompt) :])
    return _pair(prompt, *responses, row, context=tuple(context), **extra)


def conversational_pair(row: dict, render: Render) -> PreferencePair:
    """TRL's conversational preference rows; an explicit `prompt` list is prepended to both sides."""
    chosen, rejected = message_list(row, "chosen"), message_list(row, "rejected")
    if _optional(row, "prompt") is not None:
        shared = message_list(row, "prompt")
        chosen, rejected = shared + chosen, shared + rejected
    return _chat_pair(chosen, rejected, render, row)


def ultrafeedback_pair(row: dict, render: Render) -> PreferencePair:
    """HuggingFaceH4/ultrafeedback_binarized: whole conversations plus the judge's two scores."""
    chosen, rejected = message_list(row, "chosen"), message_list(row, "rejected")
    score_chosen, score_rejected = _number(row, "score_chosen"), _number(row, "score_rejected")
    if score_chosen == score_rejected:
        raise Drop("tie", f"both scored {score_chosen:g}")
    return _chat_pair(chosen, rejected, render, row, margin=score_chosen - score_rejected)


def shp_pair(row: dict, min_score_ratio: float) -> PreferencePair:
    """stanfordnlp/SHP: two Reddit comments; `labels == 1` means A is preferred.

    The SHP paper trusts a preference only when the preferred comment's score is at least twice the
    other's; the margin is the log of the score ratio (0 would be no preference at all).
    """
    label = row.get("labels")
    if str(label) not in ("0", "1"):
        raise Drop("missing field", f"'labels' is {label!r}, not 0 or 1")
    ref_a, ref_b = _text(row, "human_ref_A"), _text(row, "human_ref_B")
    score_a, score_b = _number(row, "score_A"), _number(row, "score_B")
    if min(score_a, score_b) <= 0:
        raise Drop("below score ratio", f"scores {score_a:g} and {score_b:g}: the ratio needs positive scores")
    if max(score_a, score_b) / min(score_a, score_b) < min_score_ratio:
        raise Drop("below score ratio", f"scores {score_a:g} and {score_b:g}, ratio under {min_score_ratio:g}")
    a_preferred = str(label) == "1"
    chosen, rejected = (ref_a, ref_b) if a_preferred else (ref_b, ref_a)
    score_chosen, score_rejected = (score_a, score_b) if a_preferred else (score_b, score_a)
    return _pair(_text(row, "history"), chosen, rejected, row, margin=math.log(score_chosen / score_rejected))


# -------------------------------------------------------------------------------------- factories
# One table per record kind, keyed by `SourceConfig.format`: a format missing from the tables is an
# error that lists the valid ones, never a fall-back to another format's reader.


def _chat(
    adapt: Callable[..., PreferencePair],
) -> Callable[[SourceConfig, Render | None], Callable[[dict], PreferencePair]]:
    def build(source: SourceConfig, render: Render | None) -> Callable[[dict], PreferencePair]:
        return partial(adapt, render=_need_render(source, render))

    return build


def _shp(source: SourceConfig, render: Render | None) -> Callable[[dict], PreferencePair]:
    ratio = DEFAULT_MIN_SCORE_RATIO if source.min_score_ratio is None else source.min_score_ratio
    return partial(shp_pair, min_score_ratio=ratio)


# format -> (source, chat renderer) -> row -> PreferencePair
PAIR_ADAPTERS: dict[str, Callable[[SourceConfig, Render | None], Callable[[dict], PreferencePair]]] = {
    "hh_rlhf": lambda source, render: partial(hh_rlhf_pair, render=render),
    "prompt_chosen_rejected": lambda source, render: prompt_chosen_rejected_pair,
    "conversational": _chat(conversational_pair),
    "ultrafeedback": _chat(ultrafeedback_pair),
    "shp": _shp,
}
PAIR_FORMATS = tuple(PAIR_ADAPTERS)
# format -> row -> SFTExample, for the formats that hold no pairs
SFT_ADAPTERS: dict[str, Callable[[dict], SFTExample]] = {
    "text": text_example,
    "prompt_completion": prompt_completion_example,
    "reviews": review_example,
}
# format -> (source, chat renderer) -> row -> a multi-turn SFTExample: the loss on every assistant turn
CONVERSATION_ADAPTERS: dict[str, Callable[[SourceConfig, Render | None], Callable[[dict], SFTExample]]] = {
    "messages": lambda source, render: partial(messages_example, render=_need_render(source, render)),
    "hh_rlhf": lambda source, render: partial(hh_rlhf_example, render=render),
    "conversational": lambda source, render: partial(chosen_conversation_example, render=_need_render(source, render)),
    "ultrafeedback": lambda source, render: partial(chosen_conversation_example, render=_need_render(source, render)),
}
FORMATS = (*SFT_ADAPTERS, "messages", *PAIR_ADAPTERS)


def pair_adapter(source: SourceConfig, render: Render | None) -> Callable[[dict], PreferencePair]:
    """The row -> PreferencePair function for a source; SFT-only formats are a config error."""
    _known(source)
    if source.format not in PAIR_ADAPTERS:  # the SFT formats and "messages"
        raise DataError(
            f"{source.path}: format '{source.format}' holds no preference pairs; use one of {', '.join(PAIR_FORMATS)}"
        )
    return _remapped(PAIR_ADAPTERS[source.format](source, render), source.columns)


def sft_adapter(source: SourceConfig, render: Render | None) -> Callable[[dict], SFTExample]:
    """Row -> SFTExample; preference formats give their chosen side: SFT on the preferred replies
    (every assistant turn of a chosen conversation)."""
    _known(source)
    if source.format in SFT_ADAPTERS:
        return _remapped(SFT_ADAPTERS[source.format], source.columns)
    if source.format in CONVERSATION_ADAPTERS:
        return _remapped(CONVERSATION_ADAPTERS[source.format](source, render), source.columns)
    to_pair = pair_adapter(source, render)

    def adapt(row: dict) -> SFTExample:
        pair = to_pair(row)
        return SFTExample(
            prompt=pair.prompt, response=pair.chosen, source_id=pair.source_id, finished=pair.chosen_finished
        )

    return adapt


def prompt_adapter(source: SourceConfig, render: Render | None, seed: int) -> Callable[[dict], PromptRecord]:
    """Row -> PromptRecord with the dataset's own continuation as reference, for every format but text."""
    _known(source)
    fmt = source.format
    if fmt == "text":
        raise DataError(
            f"{source.path}: format 'text' holds no prompts; use format 'reviews' with "
            "columns {review: text} to cut texts into word prefixes, or 'prompt_completion'"
        )
    flag_column = source.columns.get("unsafe", "unsafe")  # optional: a boolean column
    if fmt == "reviews":
        lo, hi = source.prompt_words or DEFAULT_PROMPT_WORDS
        return _remapped(partial(review_prompt, words=(lo, hi), seed=seed), source.columns)
    if fmt == "messages":
        return _remapped(partial(messages_prompt, render=_need_render(source, render)), source.columns)
    if fmt in PAIR_ADAPTERS:
        to_pair = pair_adapter(source, render)

        def parts(row: dict) -> tuple:  # the prompt, its preferred reply as the dataset's own, the conversation
            pair = to_pair(row)
            return pair.prompt, pair.source_id, pair.chosen, pair.context

    else:  # prompt_completion
        to_example = sft_adapter(source, render)

        def parts(row: dict) -> tuple:
            example = to_example(row)
            return example.prompt, example.source_id, example.response, None

    def adapt(row: dict) -> PromptRecord:
        prompt, source_id, reference, messages = parts(row)
        return PromptRecord(prompt, source_id, reference, unsafe=bool(row.get(flag_column, False)), messages=messages)

    return adapt


def _known(source: SourceConfig) -> None:
    if source.format not in FORMATS:
        raise DataError(f"{source.path}: unknown format '{source.format}'; valid formats: {', '.join(FORMATS)}")


def _remapped(adapt: Callable[[dict], Record], columns: dict[str, str]) -> Callable[[dict], Any]:
    return adapt if not columns else (lambda row: adapt(remap(row, columns)))


def _need_render(source: SourceConfig, render: Render | None) -> Render:
    if render is None:
        raise DataError(
            f"{source.path}: format '{source.format}' is rendered with the tokenizer's chat template, "
            "and this tokenizer has none; use a model whose tokenizer has one (a scratch model's always does)"
        )
    return render


def guess_format(row: dict) -> str | None:
    """The format a raw row looks like (by its columns), for `rlhfdpo config new`; None if none fits."""

    def text(name: str) -> bool:
        return isinstance(row.get(name), str)

    def messages(name: str) -> bool:
        return isinstance(row.get(name), list)

    if text("chosen") and text("rejected"):
        if text("prompt"):
            return "prompt_chosen_rejected"
        if HH_ASSISTANT in row["chosen"]:
            return "hh_rlhf"
    if messages("messages"):
        return "messages"
    if messages("chosen") and messages("rejected"):
        return "ultrafeedback" if "score_chosen" in row else "conversational"
    if "human_ref_A" in row and "human_ref_B" in row:
        return "shp"
    if text("review"):
        return "reviews"
    if text("prompt") and text("completion"):
        return "prompt_completion"
    if text("text"):
        return "text"
    return None
