"""Records to token ids with loss masks, and batches of them.

The prompt and the response are tokenized separately and concatenated, so the response tokens are
exactly the tokens after the prompt's: no BPE merge can straddle the boundary and move it. Labels
are -100 on the prompt; the EOS is appended once, and only to a response that was not cut short
(a truncated response must not teach the model to stop mid-sentence). A conversation is tokenized
piece by piece the same way, with the loss on its assistant replies only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import DataConfig
from pipeline.data.records import Drop, PreferencePair, SFTExample

IGNORE = -100


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    prompt_length: int  # tokens before the (first) response; labels are masked there
    # For a conversation, which tokens carry the loss (its assistant replies); None: every token
    # after the prompt.
    trained: tuple[bool, ...] | None = None

    @property
    def labels(self) -> list[int]:
        if self.trained is not None:
            return [token if on else IGNORE for token, on in zip(self.input_ids, self.trained)]
        return [IGNORE] * self.prompt_length + self.input_ids[self.prompt_length :]


@dataclass(frozen=True)
class TokenizedPair:
    chosen: TokenizedExample
    rejected: TokenizedExample
    margin: float = 0.0
    rating: str | None = None


def encode_prompt(tokenizer, prompt: str, data: DataConfig) -> list[int]:
    """Prompt ids starting with exactly one BOS when the tokenizer has one; raises Drop if too long."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    bos = tokenizer.bos_token_id
    if bos is not None:
        while len(ids) >= 2 and ids[0] == bos and ids[1] == bos:  # a chat template may add its own
            ids = ids[1:]
        if not ids or ids[0] != bos:
            ids = [bos] + ids
    if len(ids) > data.max_prompt_length:
        if data.long_prompts == "drop":
            raise Drop("prompt too long", f"{len(ids)} tokens > max_prompt_length={data.max_prompt_length}")
        keep = data.max_prompt_length
        ids = ids[-keep:] if data.truncate_prompt == "keep_end" else ids[:keep]
    return ids


def encode_response(tokenizer, response: str, budget: int, data: DataConfig, finished: bool = True) -> list[int]:
    """Response ids within `budget` tokens; EOS appended when the response finished and fits whole.

    An unfinished response (sampled up to a token limit) gets no EOS: every stage, and PPO's and
    the comparison's scoring, see a cut response as cut.
    """
    ids = through_end_of_turn(tokenizer, tokenizer(response, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if finished and eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    if len(ids) <= budget:
        return ids
    if data.truncate_response == "keep_start":
        return ids[:budget]
    return ids[-budget:]


def through_end_of_turn(tokenizer, ids: list[int]) -> list[int]:
    """Ids cut after their last EOS when only whitespace follows it.

    A chat template may write a newline after a turn's end (Qwen's "<|im_end|>\\n"), but sampling
    stops at the EOS: training on the newline would teach a token the sampler never produces, and
    append a second EOS after it.
    """
    eos = tokenizer.eos_token_id
    if eos is None or eos not in ids:
        return ids
    last = len(ids) - 1 - ids[::-1].index(eos)
    if last + 1 < len(ids) and not tokenizer.decode(ids[last + 1 :]).strip():
        return ids[: last + 1]
    return ids


def tokenize_example(
    tokenizer, prompt: str, response: str, data: DataConfig, finished: bool = True
) -> TokenizedExample:
    prompt_ids = encode_prompt(tokenizer, prompt, data)
    response_ids = encode_response(tokenizer, response, data.max_length - len(prompt_ids), data, finished)
    return TokenizedExample(prompt_ids + response_ids, len(prompt_ids))


def tokenize_sft(tokenizer, example: SFTExample, data: DataConfig) -> TokenizedExample:
    if example.segments:
        return tokenize_conversation(tokenizer, example, data)
    return tokenize_example(tokenizer, example.prompt, example.response, data, example.finished)


def tokenize_conversation(tokenizer, example: SFTExample, data: DataConfig) -> TokenizedExample:
    """A conversation's pieces tokenized one by one: the first as a prompt (BOS, max_prompt_length),
    the loss on every assistant reply and its end of turn, EOS after the last reply if it has none.

    A conversation longer than `data.max_length` keeps its start; a reply cut there gets no EOS.
    """
    first, _ = example.segments[0]
    ids = encode_prompt(tokenizer, first, data)
    trained = [False] * len(ids)
    replies = [i for i, (_, on) in enumerate(example.segments) if on]
    eos = tokenizer.eos_token_id
    for i, (text, on) in enumerate(example.segments[1:], start=1):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not on:
            ids += piece
            trained += [False] * len(piece)
            continue
        reply = through_end_of_turn(tokenizer, piece)
        after = piece[len(reply) :]  # whitespace after the end of turn: kept between turns, not trained
        if i == replies[-1]:
            after = []
            if example.finished and eos is not None and (not reply or reply[-1] != eos):
                reply = reply + [eos]
        ids += reply + after
        trained += [True] * len(reply) + [False] * len(after)
    ids, trained = ids[: data.max_length], trained[: data.max_length]
    if not any(trained):
        raise Drop("prompt too long", f"no assistant reply starts within max_length={data.max_length} tokens")
    return TokenizedExample(ids, trained.index(True), tuple(trained))


def tokenize_pair(tokenizer, pair: PreferencePair, data: DataConfig, margin: float = 0.0) -> TokenizedPair:
    return TokenizedPair(
        chosen=tokenize_example(tokenizer, pair.prompt, pair.chosen, data, pair.chosen_finished),
        rejected=tokenize_example(tokenizer, pair.prompt, pair.rejected, data, pair.rejected_finished),
        margin=margin,
        rating=pair.rating,
    )


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask and labels, each (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pair_length(pair: TokenizedPair) -> int:
    """The row width a pair needs in a concatenated batch: its longer side."""
    return max(len(pair.chosen.input_ids), len(pair.rejected.input_ids))


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one (2B, T) batch, for a single concatenated forward."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    return batch
