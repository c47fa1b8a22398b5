"""PPO's value function as a head on the policy's own trunk (`value_model: shared`).

A separate value model doubles the update: its own forward and backward over every rollout token,
about as many FLOPs as the policy's. The policy's forward already computes each position's last
hidden state, so a linear head on it gives the values: the rollout's values come out of the
policy's pass, and each update step is one forward and one backward for both losses. The value
loss then trains the trunk as well (weighted by ppo.value_coef), as in the original PPO of Schulman
et al. 2017 and the value head of TRL's first PPO trainer. The head itself trains with its own
optimizer at ppo.value_lr, by default 100x the policy's learning rate: it starts from nothing, where a
separate value model starts from the reward model.

A checkpoint and the final run hold the head as `value-head/` (a safetensors file and its width).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.errors import InputError

WEIGHTS = "value_head.safetensors"
CONFIG = "value_head.json"


class ValueHead(torch.nn.Module):
    """hidden (B, T, H) -> values (B, T), computed in float32 (as the reward and value models' heads)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = torch.nn.Linear(hidden_size, 1)
        # Small initial values (OpenRLHF's init): the first advantages are close to the returns.
        torch.nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1))
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            weight, bias = self.linear.weight, self.linear.bias
            return torch.nn.functional.linear(hidden.float(), weight.float(), bias.float()).squeeze(-1)

    # What launch.save_pretrained writes for a module that is not a Hugging Face model.
    def save_folder(self, state: dict, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS))
        (folder / CONFIG).write_text(json.dumps({"hidden_size": self.hidden_size}) + "\n")


def hidden_size_of(model) -> int:
    config = model.config.get_text_config(decoder=True)
    return config.hidden_size


def new_value_head(policy, folder: Path | None = None) -> ValueHead:
    """A head for `policy`'s hidden size: fresh, or the one saved in `folder` (a checkpoint's value-head/)."""
    head = ValueHead(hidden_size_of(policy))
    if folder is None:
        return head
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        saved = json.loads((folder / CONFIG).read_text())["hidden_size"]
        state = load_file(str(folder / WEIGHTS))
    except (OSError, KeyError, ValueError, SafetensorError) as err:
        raise InputError(f"{folder}: cannot load the value head ({type(err).__name__}: {err})") from None
    if saved != head.hidden_size:
        raise InputError(f"{folder}: a value head for hidden size {saved}, but the policy's is {head.hidden_size}")
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(f"{folder}: not a value head's weights ({str(err).splitlines()[0]})") from None
    return head
