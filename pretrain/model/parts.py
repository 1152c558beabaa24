"""Pieces both model families' stages share: state-dict hooks for megatron's layers, the zero that
keeps unused branches in the gradient, and the check that image features fill their slots."""

from __future__ import annotations

import torch
from torch import nn


def drop_empty_extra_state(_module, state_dict, _prefix, _metadata):
    """megatron's linear layers write an ``_extra_state`` of None (a Transformer Engine hook we do
    not use); checkpoint tools that expect tensors (DeepSpeed's universal converter) choke on it."""
    for key in [k for k, v in state_dict.items() if k.endswith("._extra_state") and v is None]:
        del state_dict[key]
    return state_dict


def accept_missing_extra_state(module, state_dict, prefix, *_args):
    for name, sub in module.named_modules():
        if type(sub).get_extra_state is not nn.Module.get_extra_state:
            state_dict.setdefault(f"{prefix}{name}._extra_state", None)


def zero_touch(items: list) -> torch.Tensor | float:
    """A zero that depends on one element of every trainable parameter of ``items``.

    Added to an activation when a branch is unused in a micro-batch (no understanding image, no
    generation sample): every trainable parameter then gets a gradient (of zeros) on every rank, so
    DeepSpeed's gradient reduction sees the same parameters everywhere instead of hanging or
    mismatching buckets between ranks whose micro-batches hold different tasks.
    """
    params = []
    for item in items:
        params += [item] if isinstance(item, nn.Parameter) else list(item.parameters())
    touched = [p.reshape(-1)[:1] for p in params if p.requires_grad]
    if not touched:
        return 0.0
    return torch.cat(touched).sum() * 0.0


def flatten_checked(features: torch.Tensor, positions: torch.Tensor, what: str) -> torch.Tensor:
    flat = features.reshape(-1, features.shape[-1])
    if flat.shape[0] != positions.numel():
        raise ValueError(
            f"{positions.numel()} {what} positions in the sequence but the images give {flat.shape[0]} "
            "features: the shard's image slots do not match the model's image size"
        )
    return flat
