"""Reward-model scoring: one way to turn (prompt, response, finished) into a score, for every stage.

The reward stage trains on tokenized pairs; PPO scores its rollouts and the comparison its samples.
All three go through `reward_example` (the same tokenization as training: EOS only after a response
that finished) and `sequence_scores` (the score at the last attended token), so a given prompt and
response get the same number wherever they are scored. A reward model keeps its own tokenizer: when
it is not the policy's, the rollout text is tokenized again (and rendered with the reward model's
chat template when there is one and the prompt's messages are known), never fed as foreign ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.config import ConfigError, DataConfig, check_reward_model_path
from pipeline.data.tokenize import TokenizedExample, collate, tokenize_example
from pipeline.errors import InputError
from pipeline.launch import Dist, shard
from pipeline.models import ScalarHead, from_pretrained, last_scores
from pipeline.prompt_groups import PromptGroups


def sequence_scores(head, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward of each row: the head's score at its last attended token. (B, T), (B, T) -> (B,)."""
    return last_scores(head(input_ids=input_ids, attention_mask=attention_mask), attention_mask)


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map every text to the same ids (same vocabulary, same special tokens)."""
    if a is b:
        return True
    return (
        a.get_vocab() == b.get_vocab()
        and a.eos_token_id == b.eos_token_id
        and a.bos_token_id == b.bos_token_id
        and getattr(a, "chat_template", None) == getattr(b, "chat_template", None)
    )


@dataclass
class RewardModel:
    """A loaded reward model: its head, its own tokenizer, and the statistics its stage saved."""

    path: str
    head: torch.nn.Module  # ScalarHead, possibly sharded
    tokenizer: object
    mean: float | None
    std: float | None

    def examples(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        finished: Sequence[bool],
        messages: Sequence[tuple[dict, ...] | None] | None,
        max_prompt_length: int,
    ) -> list[TokenizedExample]:
        """prompt + response as this model was trained to read them (see `reward_example`).

        A prompt keeps its last `max_prompt_length` tokens; a response is cut only at the model's
        last position, so a response that finished keeps its EOS.
        """
        positions = self.positions
        data = DataConfig(max_length=positions, max_prompt_length=min(max_prompt_length, positions - 1))
        messages = messages or [None] * len(prompts)
        return [
            reward_example(self.tokenizer, p, r, f, m, data)
            for p, r, f, m in zip(prompts, responses, finished, messages)
        ]

    @property
    def positions(self) -> int:
        config = self.head.config
        return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 2048

    @torch.no_grad()
    def score(
        self, examples: list[TokenizedExample], batch_size: int, device: torch.device, share_prompt: bool = False
    ) -> torch.Tensor:
        """Raw scores (N,) on the CPU, in `batch_size` forward passes; `share_prompt`: the examples of
        a pass that begin with the same prompt read it once (pipeline/prompt_groups.py)."""
        return score_examples(self.head, examples, self.tokenizer.pad_token_id, batch_size, device, share_prompt)


def reward_example(
    tokenizer, prompt: str, response: str, finished: bool, messages: tuple[dict, ...] | None, data: DataConfig
) -> TokenizedExample:
    """(prompt, response, finished) tokenized as the reward stage tokenizes a pair's side.

    With a chat template and the prompt's messages, the conversation is rendered with this
    tokenizer's own template; a finished reply gets the template's end of turn, a cut one does not.
    """
    template = getattr(tokenizer, "chat_template", None)
    if messages and template:
        prompt_text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        if finished:
            full = tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": response}], tokenize=False
            )
            if full.startswith(prompt_text):
                return tokenize_example(tokenizer, prompt_text, full[len(prompt_text) :], data, finished)
        prompt = prompt_text
    return tokenize_example(tokenizer, prompt, response, data, finished)


@torch.no_grad()
def score_examples(
    head, examples: list[TokenizedExample], pad_id: int, batch_size: int, device, share_prompt: bool = False
) -> torch.Tensor:
    out = []
    for start in range(0, len(examples), batch_size):
        part = examples[start : start + batch_size]
        batch = collate(part, pad_id)
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        groups = PromptGroups.of(input_ids, attention_mask, [e.prompt_length for e in part]) if share_prompt else None
        groups = groups and groups.for_model(head)
        if groups is not None:
            out.append(last_scores(groups.scores(head), attention_mask).cpu())
        else:
            out.append(sequence_scores(head, input_ids, attention_mask).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def load_reward_model(path: str | Path, dtype: str, dist: Dist, require_stats: bool = False) -> RewardModel:
    """A reward model folder (or hub id), refused in one line if it is not a one-label sequence classifier."""
    path = str(path)
    try:
        check_reward_model_path("reward model", path)
    except ConfigError as err:
        raise InputError(str(err)) from None
    hf = from_pretrained(AutoModelForSequenceClassification, path, dtype=torch.float32)
    if hf.config.num_labels != 1:
        raise InputError(f"{path}: a reward model has one label, this classifier has {hf.config.num_labels}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise InputError(
            f"{path}: the reward model has no tokenizer to read text with ({type(err).__name__}); "
            "save its tokenizer beside it"
        ) from None
    if tokenizer.pad_token_id is None:  # a hub reward model's: scored at the last attended token, pad is never read
        tokenizer.pad_token = tokenizer.eos_token
    mean, std = getattr(hf.config, "reward_mean", None), getattr(hf.config, "reward_std", None)
    if require_stats and (mean is None or std is None):
        raise InputError(
            f"{path}: no reward_mean/reward_std in its config (they are saved by `rlhfdpo reward`), so its "
            "scores cannot be normalised; set reward.normalize: false to use its raw scores"
        )
    head = shard(ScalarHead(hf), dist, dtype).eval().requires_grad_(False)
    return RewardModel(path, head, tokenizer, mean, std)
