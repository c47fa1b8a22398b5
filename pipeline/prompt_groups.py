"""A prompt computed once for all of its samples (`ppo.share_prompt`): a group's rollouts as one row.

GRPO and RLOO sample `ppo.samples_per_prompt` responses to each prompt, and every pass over the
rollouts (the reference's, the reward model's, the policy's in the update) would otherwise compute
the prompt once per sample. Here the rows of a micro-batch that begin with the same prompt become one
row [prompt, response 1, ..., response k]. Each response attends to the prompt and to itself (the
segment mask of pipeline/prefix_sharing.py, with a segment per response) and its position ids
restart after the prompt, so every token has the hidden state it has in a row of its own.
`location` maps each attended position of the original rows to its place in the grouped rows, so
every result comes back in the original (B, T) layout: the losses, the KL and the advantages never
see the difference.

Shapes: B original rows (T wide), G grouped rows (W wide), N labelled tokens, V vocabulary, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.data.tokenize import IGNORE
from pipeline.logprobs import logits_at
from pipeline.prefix_sharing import PAD, PROMPT, shares_prefixes
from pipeline.prefix_sharing import attention_mask as segment_mask


@dataclass
class PromptGroups:
    input_ids: torch.Tensor  # (G, W)
    position_ids: torch.Tensor  # (G, W): each response restarts after its prompt
    segments: torch.Tensor  # (G, W): PROMPT, the response's number from 1, or PAD
    location: torch.Tensor  # (B, T): each attended position's index into the flattened (G * W); -1 elsewhere

    @classmethod
    def of(
        cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: list[int]
    ) -> PromptGroups | None:
        """The grouped layout of right-padded rows whose first `prompt_lengths[r]` tokens are the prompt;
        None where no two rows share a prompt (there is nothing to save), a row has no prompt token
        (nothing would predict its first response token) or is not one run of attended positions."""
        rows, width = input_ids.shape
        lengths = attention_mask.sum(-1)
        one_run = torch.arange(width, device=attention_mask.device) < lengths.unsqueeze(1)
        if not torch.equal(attention_mask.bool(), one_run) or min(prompt_lengths, default=0) < 1:
            return None
        ids, lengths = input_ids.cpu(), lengths.tolist()
        members: dict[tuple[int, ...], list[int]] = {}
        for row, prompt in enumerate(prompt_lengths):
            members.setdefault(tuple(ids[row, :prompt].tolist()), []).append(row)
        if len(members) == rows:
            return None
        groups = list(members.values())
        widths = [prompt_lengths[g[0]] + sum(lengths[r] - prompt_lengths[r] for r in g) for g in groups]
        shape = (len(groups), max(widths))
        grouped = torch.zeros(shape, dtype=torch.long)  # padding is never attended: any id will do
        positions = torch.zeros(shape, dtype=torch.long)
        segments = torch.full(shape, PAD, dtype=torch.long)
        location = torch.full((rows, width), -1, dtype=torch.long)
        for g, group in enumerate(groups):
            prompt = prompt_lengths[group[0]]
            base = g * shape[1]
            grouped[g, :prompt] = ids[group[0], :prompt]
            positions[g, :prompt] = torch.arange(prompt)
            segments[g, :prompt] = PROMPT
            start = prompt
            for number, row in enumerate(group, start=1):
                n = lengths[row] - prompt
                grouped[g, start : start + n] = ids[row, prompt : lengths[row]]
                positions[g, start : start + n] = torch.arange(prompt, lengths[row])
                segments[g, start : start + n] = number
                location[row, :prompt] = base + torch.arange(prompt)
                location[row, prompt : lengths[row]] = base + torch.arange(start, start + n)
                start += n
        device = input_ids.device
        return cls(grouped.to(device), positions.to(device), segments.to(device), location.to(device))

    def for_model(self, model) -> PromptGroups | None:
        """These groups where `model` takes a segment mask (pipeline/prefix_sharing.py), else None: the
        model reads the rows as they are."""
        return self if shares_prefixes(model) else None

    def inputs(self, model) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": segment_mask(self.segments, model),
            "position_ids": self.position_ids,
        }

    def ungroup(self, grouped: torch.Tensor) -> torch.Tensor:
        """(G, W, ...) -> (B, T, ...): each original position's value, 0 on padding."""
        # index_select, not indexing: a prompt position is read by every sample, and indexing's backward
        # adds the repeats atomically across threads, in an order that changes from run to run
        values = grouped.flatten(0, 1).index_select(0, self.location.clamp(min=0).flatten())
        values = values.view(*self.location.shape, *values.shape[1:])
        attended = (self.location >= 0).view(*self.location.shape, *([1] * (values.dim() - 2)))
        return torch.where(attended, values, torch.zeros((), dtype=values.dtype, device=values.device))

    def response_logits(
        self, model, labels: torch.Tensor, with_hidden: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """logprobs.response_logits of the original rows from one forward over the grouped ones:
        (logits (N, V) of the positions whose next token is labelled, row-major; kept (B, T-1);
        hidden (B, T, H) or None). A prompt's last position predicts every response's first token:
        its logits are computed once and read once per response."""
        kept = labels[:, 1:] != IGNORE
        rows, positions = kept.nonzero(as_tuple=True)
        sources = self.location[rows, positions]  # (N,): where each predicting position sits
        if bool((sources < 0).any()):
            raise ValueError("a labelled token is predicted by a position the attention mask leaves out")
        inputs = self.inputs(model) | ({"output_hidden_states": True} if with_hidden else {})
        out, logits, index = logits_at(model, inputs, sources)
        logits = logits.index_select(0, index)  # in order, as in `ungroup`
        return logits, kept, self.ungroup(out.hidden_states[-1]) if with_hidden else None

    def scores(self, head) -> torch.Tensor:
        """A ScalarHead's score at every position of the original rows, (B, T), 0 on padding."""
        return self.ungroup(head(self.input_ids, segment_mask(self.segments, head), position_ids=self.position_ids))
