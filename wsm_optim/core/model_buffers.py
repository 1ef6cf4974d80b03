"""``merge_buffers=True``: the model's floating-point buffers, merged with the same checkpoint weights as its params.

Which buffers: the floating-point entries of ``model.state_dict()`` that are
buffers, i.e. persistent ones (running statistics of normalisation layers, MoE
routing biases such as torchtitan's ``expert_bias_E``). Integer and bool
buffers (``num_batches_tracked``) and non-persistent ones (RoPE caches,
per-step token counts) stay live: they are not the model's state, and a merge
of a constant equals that constant only up to rounding.

A buffer is found through its owning module at every pass, by name: unlike
params, buffers are replaced by new tensor objects when the model is moved or
cast (``module.to()``, ``.half()``, ``.cuda()``), so no buffer tensor can be
held by identity across the run. The registry compares the tensors found with
the last ones and the merges re-key their accumulators when one was replaced.

A window's checkpoint 0 (its anchor) is taken at the start of the step after
the previous window's last checkpoint, before the inner step: params are still
what that checkpoint holds, but buffers are not (that step's forward has moved
the normalisation statistics, its step pre-hooks the routing biases). So the
buffers' values are captured at the end of a step after which a window anchors
(:meth:`ModelBuffers.capture`), and the anchor reads those.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ModelBuffers"]


class ModelBuffers:
    """The merged buffers of ``model``: their names, owners and shapes, fixed when the optimizer is built.

    Args:
        model: the module whose persistent floating-point buffers are merged
            (shared buffers counted once, under their first name, as
            ``named_buffers()`` lists them).
    """

    @classmethod
    def opted_in(cls, model: nn.Module | None, merge_buffers: bool) -> ModelBuffers | None:
        """``WSMOptimizer(model=..., merge_buffers=...)``'s buffers: ``None`` unless asked for, which needs ``model``."""
        if merge_buffers and model is None:
            raise ValueError(
                "merge_buffers=True needs model= (the module whose buffers to merge), e.g. "
                "WSMOptimizer(inner, window=..., model=model, merge_buffers=True)"
            )
        return cls(model) if merge_buffers else None

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} {model!r}")
        self.names: list[str] = []
        self.captured: dict[str, Tensor] = {}  # name -> value at the end of the last step before an anchor
        self._slots: list[tuple[nn.Module, str, tuple[int, ...]]] = []
        for name, buffer in model.named_buffers():
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            if buffer.is_floating_point() and attr not in owner._non_persistent_buffers_set:
                self.names.append(name)
                self._slots.append((owner, attr, tuple(buffer.shape)))

    def __len__(self) -> int:
        return len(self.names)

    def current(self) -> list[Tensor]:
        """The buffer tensors now (in :attr:`names` order); a buffer removed, reshaped or made non-float raises."""
        tensors = []
        for name, (owner, attr, shape) in zip(self.names, self._slots):
            buffer = owner._buffers.get(attr)
            if buffer is None:
                raise RuntimeError(
                    f"merge_buffers: the model's buffer {name!r} was removed (or set to None) after the "
                    "WSMOptimizer was built; its merge cannot go on. Build the optimizer after the model's "
                    "buffers are final"
                )
            if not buffer.is_floating_point():
                raise TypeError(
                    f"merge_buffers: the model's buffer {name!r} is now {buffer.dtype}; a merged buffer must "
                    "stay floating point (cast the model before building the optimizer)"
                )
            if tuple(buffer.shape) != shape:
                raise ValueError(
                    f"merge_buffers: the model's buffer {name!r} changed shape from {shape} to "
                    f"{tuple(buffer.shape)} after the WSMOptimizer was built; its merge cannot follow it"
                )
            tensors.append(buffer)
        return tensors

    def capture(self) -> None:
        """Keep the buffers' values now (copies, in their dtype): the next anchor's checkpoint 0."""
        with torch.no_grad():
            for name, buffer in zip(self.names, self.current()):
                kept = self.captured.get(name)
                if buffer.device.type == "meta":
                    continue  # nothing to keep yet: the anchor reads the live values
                if kept is None or (kept.device, kept.dtype) != (buffer.device, buffer.dtype):
                    self.captured[name] = buffer.detach().clone()
                else:
                    kept.copy_(buffer)

    def at_anchor(self, name: str, live: Tensor) -> Tensor:
        """What an anchor reads for the buffer ``name`` (now ``live``): the captured value, on ``live``'s device."""
        kept = self.captured.get(name)
        if kept is None:
            return live
        return kept if kept.device == live.device else kept.to(live.device)
