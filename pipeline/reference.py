"""Reference-model log-probabilities, computed once and cached on disk.

DPO needs log pi_ref(y|x) for every chosen and rejected response, and nothing else from the
reference model, so the values are computed in one pass before training and the reference model
is freed. The cache key hashes the reference weights, every tokenized sequence (which covers the
data and the tokenization settings) and the compute dtype: a beta sweep or a resumed run reuses
the file, and any change to the data or the reference model computes it afresh.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from pipeline.config import ModelConfig
from pipeline.console import console, plain
from pipeline.cost import CostMeter
from pipeline.data.tokenize import TokenizedPair
from pipeline.files import atomic_write
from pipeline.launch import Dist, barrier, shard
from pipeline.lora import adapter_base, adapters_disabled, is_adapter_folder
from pipeline.models import load_causal_lm
from pipeline.prefix_sharing import collate_for, pair_logps, share_prompt_in
from pipeline.stage_common import gather_by_index, shard_batches
from pipeline.training import StepProgress

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def weights_digest(model: ModelConfig) -> str:
    """Hash of the reference model's weight files (a local folder, or the hub snapshot in the cache)."""
    return folder_digest(model.name_or_path, model.revision)


def folder_digest(name_or_path: str, revision: str | None = None) -> str:
    """Hash of a model folder's weight files (or of its hub snapshot's): the same weights, the same hash."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name_or_path, revision=revision))
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no weight files to hash")
    digest = hashlib.sha256()
    if is_adapter_folder(folder):  # LoRA adapters are half a model: the base they apply to counts too
        digest.update(folder_digest(*adapter_base(folder)).encode())
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def data_digest(pairs: list[TokenizedPair]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        for side in (pair.chosen, pair.rejected):
            digest.update(f"{side.prompt_length}:{','.join(map(str, side.input_ids))};".encode())
    return digest.hexdigest()


def cache_path(cache_dir: str, model: ModelConfig, pairs: list[TokenizedPair]) -> Path:
    key = hashlib.sha256(f"{weights_digest(model)}|{data_digest(pairs)}|{model.dtype}".encode()).hexdigest()[:24]
    return Path(cache_dir) / f"reference-logps-{key}.pt"


def _read_cache(path: Path, n_pairs: int) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, str]:
    """((chosen, rejected), "") from a cache file that is whole and fits the pairs, else (None, what is wrong)."""
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
        chosen, rejected = cached["chosen"], cached["rejected"]
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file raises any of several types
        return None, f"cannot be read ({type(err).__name__})"
    for side in (chosen, rejected):
        if not isinstance(side, torch.Tensor) or side.shape != (n_pairs,):
            return None, f"does not hold {n_pairs} values per side"
        if not bool(torch.isfinite(side).all()):
            return None, "holds non-finite values"
    return (chosen, rejected), ""


def reference_logps(
    model: ModelConfig,
    pairs: list[TokenizedPair],
    cache_dir: str,
    batch_size: int,
    pad_id: int,
    dist: Dist,
    meter: CostMeter | None = None,
    policy: torch.nn.Module | None = None,
    share_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(chosen, rejected) summed response log-probs under the reference, each (N,), and cache hit.

    `policy`: a LoRA policy adapted from `model`; with its adapters off it is the reference (the
    cache key, the weights of `model`, stays right), and no second model is loaded. `share_prompt`:
    one row per pair, its prompt computed once, where the model's attention allows.
    """
    path = cache_path(cache_dir, model, pairs)
    if path.is_file():
        cached, problem = _read_cache(path, len(pairs))
        if cached is not None:
            return cached[0], cached[1], True
        if dist.is_main:
            console.print(
                f"[yellow]warning:[/yellow] the reference log-prob cache {plain(path)} {plain(problem)}; computing it again"
            )

    if policy is not None:  # its passes count as the policy's: they run through its weights
        reference = policy
    else:
        reference = shard(load_causal_lm(model), dist, model.dtype)
        if meter is not None:
            meter.watch(reference, "reference")
    share = share_prompt_in(reference, share_prompt, dist)
    was_training = reference.training
    reference.eval()
    mine = {}
    batches = shard_batches(len(pairs), batch_size, dist)
    with torch.no_grad(), StepProgress(dist, len(batches), 0, "reference log-probs") as progress:
        for done, part in enumerate(batches, start=1):
            batch = collate_for([pairs[i if i is not None else 0] for i in part], pad_id, share)
            with adapters_disabled(reference):
                chosen, rejected, _ = pair_logps(reference, {k: v.to(dist.device) for k, v in batch.items()})
            for j, index in enumerate(part):
                if index is not None:
                    mine[index] = (float(chosen[j]), float(rejected[j]))
            progress.update(done, {})
    reference.train(was_training)
    del reference  # a reference model of its own is not kept in memory during training
    merged = gather_by_index(dist, mine, len(pairs))
    chosen = torch.tensor([c for c, _ in merged])
    rejected = torch.tensor([r for _, r in merged])
    if dist.is_main:
        atomic_write(path, lambda staging: torch.save({"chosen": chosen, "rejected": rejected}, staging))
        console.print(f"reference log-probs for {len(pairs)} pairs cached in {plain(path)}")
    barrier(dist)
    return chosen, rejected, False
