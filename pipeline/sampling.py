"""Batched sampling with a KV cache: temperature, top-p, stop at EOS.

Prompts are left-padded so every row's next token sits in the last column; position ids count real
tokens only, so a padded prompt is continued exactly as it would be alone. Under FSDP2 every rank
must run the same number of forward passes, so the loop ends when all ranks are done.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from transformers.cache_utils import Cache, DynamicLayer

from pipeline.launch import collective_device
from pipeline.logprobs import keeps_logit_positions
from pipeline.models import attends_to_every_earlier_position


@dataclass
class Generation:
    sequences: list[list[int]]  # response token ids, EOS included when reached
    finished: list[bool]  # whether the response ended with EOS
    # with_logps: each response token's log-probability under softmax(logits / temperature), and
    # the entropy of that distribution at each step, (B, steps); row i's first len(sequences[i]) count
    logps: torch.Tensor | None = None
    entropies: torch.Tensor | None = None


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values written in place into buffers sized for the whole generation,
    (B, heads, capacity, head_dim); attention reads only the filled part, a view. transformers'
    DynamicLayer concatenates every layer's whole cache at every step (a third of sampling time
    on CPU); its StaticLayer attends over the whole capacity, empty slots included."""

    is_croppable = False

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.filled = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.key_buffer = key_states.new_empty((*key_states.shape[:2], self.capacity, key_states.shape[-1]))
        self.value_buffer = value_states.new_empty((*value_states.shape[:2], self.capacity, value_states.shape[-1]))
        self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]
        self.is_initialized = True

    def _refuse(self, *args, **kwargs):
        raise NotImplementedError("a preallocated KV cache only grows: no cropping, reordering or offloading")

    crop = batch_select_indices = batch_repeat_interleave = reorder_cache = offload = _refuse

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.filled + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions asked to hold {end}")
        self.key_buffer[:, :, self.filled : end] = key_states
        self.value_buffer[:, :, self.filled : end] = value_states
        self.filled = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self.filled = 0

    def copy_rows(self, rows: torch.Tensor) -> None:
        """Row i becomes a copy of row rows[i]: a prompt computed once, then one row per sample."""
        self.key_buffer = self.key_buffer.index_select(0, rows)
        self.value_buffer = self.value_buffer.index_select(0, rows)
        self.keys, self.values = self.key_buffer[:, :, : self.filled], self.value_buffer[:, :, : self.filled]


def preallocated_cache(model, capacity: int) -> Cache | None:
    """A cache of `capacity` positions per layer for a model whose layers all attend to every earlier
    position; None (the model's own cache) for sliding-window, chunked or shared-KV layers."""
    if not attends_to_every_earlier_position(model):
        return None
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(layers)])


def cache_argument(model) -> str:
    """The forward argument that takes a KV cache, and the output field that returns it: `cache` from
    transformers 5.24 (which warns on the old name), `past_key_values` before."""
    forward = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p. logits: (B, V)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # the first token always stays
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Sample one token per row from logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        logits = _top_p_filter(logits, top_p)
    # Inverse-CDF sampling: one uniform number per row. torch.multinomial draws an exponential
    # variate for every vocabulary entry, which was a quarter of all sampling time on CPU.
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    uniform = torch.rand(cdf.shape[0], 1, generator=generator, device=generator.device if generator else cdf.device)
    token = torch.searchsorted(cdf, uniform.to(cdf.device) * cdf[:, -1:], right=True)  # first index with cdf > u
    return token.squeeze(-1).clamp(max=cdf.shape[-1] - 1)


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    sync_ranks: bool = False,
    with_logps: bool = False,
    share_prefill: bool = True,
) -> Generation:
    device = next(model.parameters()).device
    batch = len(prompts)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    # The mask of every position the generation can reach, filled as it goes: each step passes a
    # longer view of it rather than a new, concatenated mask.
    full_mask = torch.ones((batch, width + max_new_tokens), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        full_mask[row, : width - len(prompt)] = 0
    input_ids, full_mask = input_ids.to(device), full_mask.to(device)
    attention_mask = full_mask[:, :width]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)

    # The prompt's logits are never used, only the last position's: skip the LM head on the rest.
    last_only = {"logits_to_keep": 1} if keeps_logit_positions(type(model)) else {}
    cache_name = cache_argument(model)
    cache = preallocated_cache(model, width + max_new_tokens)
    # Several samples of one prompt (GRPO, RLOO, pair sampling): each distinct prompt is computed
    # once, then its keys, values and last logits are copied to every row that samples from it.
    distinct: dict[tuple[int, ...], int] = {}  # a prompt -> its row in the prefill
    first_rows, copied_from = [], []
    for row, prompt in enumerate(prompts):
        if tuple(prompt) not in distinct:
            distinct[tuple(prompt)] = len(first_rows)
            first_rows.append(row)
        copied_from.append(distinct[tuple(prompt)])
    shares_prefill = share_prefill and cache is not None and len(first_rows) < batch
    prefill = torch.tensor(first_rows, device=device) if shares_prefill else slice(None)
    out = model(
        input_ids=input_ids[prefill],
        attention_mask=attention_mask[prefill],
        position_ids=position_ids[prefill],
        use_cache=True,
        **{cache_name: cache},
        **last_only,
    )
    cache, logits = getattr(out, cache_name), out.logits[:, -1, :]
    if shares_prefill:
        copied_from = torch.tensor(copied_from, device=device)
        for layer in cache.layers:
            layer.copy_rows(copied_from)
        logits = logits.index_select(0, copied_from)
    next_position = position_ids[:, -1] + 1  # (B,)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    generated = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    if with_logps:
        if temperature <= 0:
            raise ValueError("log-probs of greedy decoding: sample at a positive temperature")
        logps = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
        entropies = torch.zeros_like(logps)
    for t in range(max_new_tokens):
        token = next_tokens(logits, temperature, top_p, generator).to(device)
        token = token.masked_fill(done, pad_id)
        generated[:, t] = token
        if with_logps:  # the unfiltered tempered distribution, as logprob_passes scores it
            log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
            logps[:, t] = log_probs.gather(-1, token.unsqueeze(-1)).squeeze(-1)
            entropies[:, t] = -(log_probs.exp() * log_probs).sum(-1)
        done |= token == eos_id
        if _all_done(done, sync_ranks) or t == max_new_tokens - 1:
            break
        # Finished rows keep feeding pad tokens; what they attend to no longer matters.
        out = model(
            input_ids=token.unsqueeze(-1),
            attention_mask=full_mask[:, : width + t + 1],
            position_ids=next_position.unsqueeze(-1),
            use_cache=True,
            **{cache_name: cache},
        )
        cache, logits = getattr(out, cache_name), out.logits[:, -1, :]
        next_position = next_position + 1

    sequences, finished = [], []
    for row in generated.tolist():
        if eos_id in row:
            sequences.append(row[: row.index(eos_id) + 1])
            finished.append(True)
        else:  # an unfinished row ran the whole max_new_tokens
            sequences.append(row)
            finished.append(False)
    if with_logps:
        return Generation(sequences, finished, logps, entropies)
    return Generation(sequences, finished)


def _all_done(done: torch.Tensor, sync_ranks: bool) -> bool:
    flag = done.all().to(torch.int64).reshape(1)
    if sync_ranks and torch_dist.is_initialized():
        flag = flag.to(collective_device())
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MIN)
    return bool(flag.item())


def sample(
    model,
    tokenizer,
    prompts: list[list[int]],
    settings,
    generator: torch.Generator | None,
    sync_ranks: bool = False,
    with_logps: bool = False,
    share_prefill: bool = True,
) -> Generation:
    """`generate` with a SampleConfig's length, temperature and top-p, stopping at the tokenizer's EOS."""
    return generate(
        model,
        prompts,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        generator=generator,
        sync_ranks=sync_ranks,
        with_logps=with_logps,
        share_prefill=share_prefill,
    )
