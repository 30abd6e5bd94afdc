"""Exponential moving average (EMA) of model weights, for sampling and export.

After each optimizer step, ``ema = decay_n * ema + (1 - decay_n) * weights``. With warm-up the
decay at update ``n`` (1-based) is ``min(decay, (1 + n) / (10 + n))``, so that early averages
forget the random initialisation quickly. Without warm-up the decay is constant. The update counter is
part of :meth:`ExponentialMovingAverage.state_dict`, so a resumed run continues the same decay
sequence.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ExponentialMovingAverage:
    """An fp32 copy of ``model`` whose weights track the EMA of the model's weights.

    ``ema.model`` is an eval-mode module without gradients, ready for sampling. Buffers are
    copied as they are. Call :meth:`update` once per optimizer step with the trained module
    (unwrapped from DDP). ``state_dict`` / ``load_state_dict`` make it checkpointable with
    ``accelerator.register_for_checkpointing``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"invalid EMA decay {decay!r}: expected a float in [0, 1] (0 copies the weights, 1 freezes them)")
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    def current_decay(self) -> float:
        """Return the decay that the next :meth:`update` applies."""
        if not self.warmup:
            return self.decay
        updates = self.num_updates + 1
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards the weights of ``model`` (same architecture) by one step."""
        decay = self.current_decay()
        averaged = list(self.model.parameters())
        current = [parameter.detach().float() for parameter in model.parameters()]
        if len(averaged) != len(current):
            raise ValueError(f"model has {len(current)} parameters, the EMA copy {len(averaged)}: pass the model the EMA was built from")
        torch._foreach_lerp_(averaged, current, 1.0 - decay)
        for target, source in zip(self.model.buffers(), model.buffers()):
            target.copy_(source)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "weights": {key: value.clone() for key, value in self.model.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; missing entries or keys raise instead of being skipped."""
        missing = [key for key in ("decay", "warmup", "num_updates", "weights") if key not in state]
        if missing:
            raise KeyError(f"EMA state lacks {missing}: the checkpoint is incomplete or not an EMA state")
        self.decay, self.warmup, self.num_updates = float(state["decay"]), bool(state["warmup"]), int(state["num_updates"])
        self.model.load_state_dict(state["weights"], strict=True)

    def weights(self) -> dict[str, torch.Tensor]:
        """Return the averaged weights as a state dict (fp32, detached)."""
        return self.model.state_dict()
