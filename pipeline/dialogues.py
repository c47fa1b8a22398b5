"""Multi-turn rollouts: a model answers a dialogue's user turns in order, with its own replies in context.

Shared by `rlhfdpo data gatt` (the policy answers with the instruction on every user turn) and
`rlhfdpo adherence` (a model answers with the instruction in the system message only). At turn k
every dialogue still running is rendered with the tokenizer's chat template (system message, the
first k user messages, the k-1 replies so far, the generation prompt) and sampled in batches.
A dialogue whose context would leave no room for a reply within `max_length` tokens stops there,
rather than having its start (the instruction) cut off.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from pipeline.config import DataConfig, SampleConfig, SourceConfig
from pipeline.data.adapters import Render, message_list, remap
from pipeline.data.records import Drop, DropLedger
from pipeline.data.sources import read_rows
from pipeline.data.tokenize import encode_prompt
from pipeline.errors import InputError
from pipeline.instructions import Instruction
from pipeline.launch import Dist
from pipeline.sampling import sample
from pipeline.training import StepProgress


@dataclass
class Rollout:
    replies: list[str] = field(default_factory=list)  # one per turn reached, as decoded (no end of turn)
    finished: list[bool] = field(default_factory=list)  # whether each reply ended with EOS


def conversation(system: str | None, users: Sequence[str], replies: Sequence[str]) -> list[dict]:
    """Messages: the system message (if any), then user and assistant messages in turn."""
    messages = [{"role": "system", "content": system}] if system else []
    for k, user in enumerate(users):
        messages.append({"role": "user", "content": user})
        if k < len(replies):
            messages.append({"role": "assistant", "content": replies[k]})
    return messages


def require_template(tokenizer, model: str) -> Render:
    from pipeline.stage_common import chat_renderer

    render = chat_renderer(tokenizer)
    if render is None:
        raise InputError(f"{model}: its tokenizer has no chat template, and dialogues are rendered with one")
    return render


@torch.no_grad()
def roll_out(
    model,
    tokenizer,
    render: Render,
    dialogues: Sequence[tuple[str | None, Sequence[str]]],
    settings: SampleConfig,
    max_length: int,
    batch_size: int,
    generator: torch.Generator,
    progress: tuple[Dist, str] | None = None,
) -> list[Rollout]:
    """One Rollout per (system message, user messages) dialogue, turn by turn; `progress`: (dist,
    label) of a progress bar over the turns."""
    total = max((len(users) for _, users in dialogues), default=0)
    bar = StepProgress(progress[0], total, 0, progress[1]) if progress else nullcontext()
    with bar:
        return _roll_out(model, tokenizer, render, dialogues, settings, max_length, batch_size, generator, bar)


def _roll_out(model, tokenizer, render, dialogues, settings, max_length, batch_size, generator, bar) -> list[Rollout]:
    model.eval()
    rollouts = [Rollout() for _ in dialogues]
    context = DataConfig(
        max_length=max_length, max_prompt_length=max_length - settings.max_new_tokens, long_prompts="drop"
    )
    for turn in range(max((len(users) for _, users in dialogues), default=0)):
        todo: list[tuple[int, list[int]]] = []
        for i, (system, users) in enumerate(dialogues):
            if turn >= len(users) or len(rollouts[i].replies) < turn:  # done, or stopped at a full context
                continue
            text = render(conversation(system, users[: turn + 1], rollouts[i].replies), True)
            try:
                todo.append((i, encode_prompt(tokenizer, text, context)))
            except Drop:
                continue
        for start in range(0, len(todo), batch_size):
            part = todo[start : start + batch_size]
            out = sample(model, tokenizer, [ids for _, ids in part], settings, generator)
            for (i, _), sequence, done in zip(part, out.sequences, out.finished):
                rollouts[i].replies.append(tokenizer.decode(sequence, skip_special_tokens=True))
                rollouts[i].finished.append(done)
        if isinstance(bar, StepProgress):
            bar.update(turn + 1, {})
    return rollouts


def with_system(instruction: str, system: str | None) -> str:
    """The system message that carries the instructions: them first, then the dialogue's own system message."""
    return instruction if not system else f"{instruction}\n{system}"


SENTINEL = "\x00content\x00"


@dataclass(frozen=True)
class MessageSpan:
    """Where one message lies among a conversation's tokens."""

    start: int  # its first token, template markup included
    end: int  # one past its last token (its end of turn included)
    content_start: int  # its content's first token
    content_end: int  # one past its content's last token (before the end of turn)


def message_spans(tokenizer, render: Render, messages: list[dict]) -> tuple[list[int], list[MessageSpan]]:
    """The conversation's token ids (after one BOS, as every stage starts) and each message's span.

    Rendered message by message and tokenized piece by piece, as SFT tokenizes a conversation. A
    message's content is found by rendering it once more with a sentinel for its content: what the
    template writes before the sentinel is its header, after it its trailer, whatever the template
    does to the content itself (strip it, say). Raises Drop for a template that rewrites earlier turns.
    """
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    spans: list[MessageSpan] = []
    done = ""
    for i, message in enumerate(messages):
        text = render(messages[: i + 1], False)
        marked = render([*messages[:i], {**message, "content": SENTINEL}], False)
        if not text.startswith(done) or not marked.startswith(done) or SENTINEL not in marked:
            raise Drop("template mismatch", f"rendering message {i} changes the text before it")
        piece = text[len(done) :]
        header = marked[len(done) :].index(SENTINEL)
        trailer = len(marked) - len(done) - header - len(SENTINEL)
        encoded = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        piece_ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        if i == 0 and bos is not None and (not piece_ids or piece_ids[0] != bos):
            ids = [bos]
        start = len(ids)
        inside = [k for k, (a, b) in enumerate(offsets) if b > header and a < len(piece) - trailer]
        content = (start + inside[0], start + inside[-1] + 1) if inside else (start, start)
        ids = ids + piece_ids
        spans.append(MessageSpan(start, len(ids), *content))
        done = text
    return ids, spans


@torch.no_grad()
def attention_on(model, ids: list[int], target: tuple[int, int], queries: list[tuple[int, int]]) -> torch.Tensor:
    """Attention mass on the `target` tokens from each span of `queries`, per layer: (L, len(queries)).

    A query span [s, e) names the tokens a reply generated; the attention read is that of the
    positions that generated them, [s-1, e-1). For each layer, their attention weights on the
    target's key positions are summed over the target (the share of attention it gets, in [0, 1])
    and averaged over heads and positions. Needs eager attention (weights are materialised).
    """
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), output_attentions=True)
    per_layer = []
    for weights in out.attentions:  # each (1, H, T, T)
        on_target = weights[0, :, :, target[0] : target[1]].sum(-1)  # (H, T): mass on the target per query
        per_layer.append(torch.stack([on_target[:, s - 1 : e - 1].mean() for s, e in queries]))
    return torch.stack(per_layer).float().cpu()  # (L, Q)


def generated(span: MessageSpan, ids: list[int], eos_id: int | None) -> tuple[int, int]:
    """The tokens a reply's sampler produced: its content and the end of turn that stopped it."""
    stop = span.content_end + 1 if span.content_end < span.end and ids[span.content_end] == eos_id else span.content_end
    return span.content_start, stop


def read_dialogues(source: SourceConfig, ledger: DropLedger) -> list[tuple[str, str | None, list[str]]]:
    """(row id, system message or None, user messages) of each `messages` row; replies are not kept.

    A row with no user message is dropped and counted; the dialogues keep the file's order.
    """
    out = []
    for row in read_rows(source):
        try:
            messages = message_list(remap(row, source.columns), "messages")
            users = [m["content"] for m in messages if m["role"] == "user"]
            if not users:
                raise Drop("missing field", "'messages' holds no user message")
        except Drop as drop:
            ledger.drop(source.path, row["_id"], drop)
            continue
        ledger.keep(source.path)
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        out.append((row["_id"], system, users))
    return out


def instructions_from(specs: Sequence) -> list[Instruction]:
    """The configured instructions, or the built-in task's when none are configured."""
    if not specs:
        from pipeline.data.builtin_dialogues import INSTRUCTIONS

        return list(INSTRUCTIONS)
    return [Instruction(s.text, s.short, s.sentiment, s.contains, s.max_words) for s in specs]
