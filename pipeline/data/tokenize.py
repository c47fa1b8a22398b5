"""Records to token ids with loss masks, and batches of them.

The prompt and the response are tokenized separately and concatenated, so the response tokens are
exactly the tokens after the prompt's: no BPE merge can straddle the boundary and move it. Labels
are -100 on the prompt; the EOS is appended once, and only to a response that was not cut short
(a truncated response must not teach the model to stop mid-sentence).
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
    prompt_length: int  # tokens before the response; labels are masked there

    @property
    def labels(self) -> list[int]:
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
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if finished and eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    if len(ids) <= budget:
        return ids
    if data.truncate_response == "keep_start":
        return ids[:budget]
    return ids[-budget:]


def tokenize_example(
    tokenizer, prompt: str, response: str, data: DataConfig, finished: bool = True
) -> TokenizedExample:
    prompt_ids = encode_prompt(tokenizer, prompt, data)
    response_ids = encode_response(tokenizer, response, data.max_length - len(prompt_ids), data, finished)
    return TokenizedExample(prompt_ids + response_ids, len(prompt_ids))


def tokenize_sft(tokenizer, example: SFTExample, data: DataConfig) -> TokenizedExample:
    return tokenize_example(tokenizer, example.prompt, example.response, data, example.finished)


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
