"""``WSMOptimizer``: the ``torch.optim`` face of the streaming WSM merge.

This file is the constructor, the ordering of ``step()`` and the public
readouts. What they rest on lives in one module each: the options in
``spec``, the window arithmetic in ``window``, each merge with its accumulators in
``merge``, the params in ``registry``, the NaN/inf policy in ``nonfinite``,
the readouts in ``readout``, the state-dict format in ``persistence``, the
update arithmetic in ``backends``, the framework calls of ``step()`` in ``callers``.

All mutable state sits in one :class:`~wsm_optim.core.runtime.Runtime` object,
assigned once in the constructor: framework wrappers such as Lightning's
``LightningOptimizer`` forward or copy the wrapper's attributes, and methods
entered through them still change the one shared runtime.
"""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import schedules
from . import callers, distributed, persistence, readout
from .bypass import BypassGuard, count_step
from .model_buffers import ModelBuffers
from .moments import MomentMerge, ShapeFit
from .nonfinite import NonFiniteMergeError
from .runtime import EngineBinding, Runtime
from .spec import DEFAULT_MERGE, MergeSpec, WSMOptions, check_bool

__all__ = ["WSMOptimizer", "MergeSpec", "DEFAULT_MERGE", "NonFiniteMergeError"]


def _inner_attribute(name: str) -> property:
    """An attribute of the wrapper that lives on the inner optimizer (get, set and delete go there)."""
    return property(lambda self: getattr(self.inner, name), lambda self, v: setattr(self.inner, name, v),
                    lambda self: delattr(self.inner, name))


def _one_shape(shape: Any, what: str) -> None:
    if isinstance(shape, (list, tuple)):
        raise TypeError(f"{what} reads one shape at a time, got a {type(shape).__name__}; "
                        "merged_state_dict(shape=[...]) returns one state dict per shape")


class WSMOptimizer(torch.optim.Optimizer):
    r"""Wrap any optimizer and keep the WSM merge of its recent checkpoints.

    After warmup, train at constant LR; this wrapper maintains, in one fp32
    accumulator per parameter and merge, the weighted merge of the last window's
    checkpoints that Theorem 3.1 of the WSM paper equates to a learning-rate
    decay of the given shape (``docs/method.md``). No checkpoint is stored.

    Args:
        inner: the optimizer to wrap (any ``torch.optim.Optimizer``). Build it
            from ``model.named_parameters()`` so readouts are keyed by name.
        schedule: decay shape: a name of :data:`wsm_optim.schedules.SHAPES`
            (``"linear"``, ``"cosine"``, ``"1-sqrt"``, ...) or of its ``ALIASES``; a
            callable ``f(t)`` with ``f(0) = 1``; or explicit ``w_1..w_k``.
        window: optimizer steps per merge window; a positive multiple of ``interval``.
        interval: steps between checkpoints. ``k = window // interval``
            updates and ``k + 1`` checkpoints per window.
        start: steps before the first window is anchored. Until then the
            merged model is the live model. Windows then tumble: each new
            window is anchored at the last checkpoint of the previous one.
        backend: ``"foreach"``, ``"triton"`` (CUDA, or CPU under
            ``TRITON_INTERPRET=1``) or ``"auto"`` (Triton when the params are
            on CUDA at the first ``step()``, foreach otherwise).
        keep_last: keep the last completed window's merge in one more fp32
            accumulator per parameter, readable with ``completed=True``. A bool.
        merges: several merges updated side by side, ``{name: MergeSpec(...)}``
            or ``{name: dict(schedule=..., window=..., interval=..., start=...,
            keep_last=...)}``. Mutually exclusive with the single-merge
            arguments; readouts take ``merge=name``.
        model: optional module; readouts then return complete
            ``model.state_dict()``-style dicts (buffers from the live model,
            or merged with ``merge_buffers=True``).
        merge_buffers: also merge ``model``'s floating-point buffers (those in
            its ``state_dict()``: normalisation statistics, MoE routing biases)
            with the same checkpoint weights as the params: readouts and
            ``merged_weights()`` then give merged buffers, and the state dict
            saves their accumulators. Integer buffers and non-persistent ones
            stay live. Needs ``model``. A bool, default ``False``.
        nonfinite: ``"raise"`` (default): a NaN/inf that reached a merge makes
            its readouts raise :class:`NonFiniteMergeError` naming the window
            and the first bad parameter; nothing is checked per step. ``"skip"``:
            each checkpoint is checked first (on the device, no host sync); a
            checkpoint with a non-finite value is left out of the merge, and
            readouts renormalize the remaining weights and warn.
        overlap: CUDA only: run the checkpoint update on a side stream so it
            overlaps the next forward/backward; it is joined before the next
            inner step, readout or state_dict.
        capturable: launch the update every step and let the Triton kernel
            decide on the device whether a checkpoint is due, so a step can be
            captured in a CUDA graph. After graph replays call :meth:`sync_steps`
            before reading the merge. Needs the Triton backend.
        offload: ``None`` (default): accumulators beside their params. ``"cpu"``:
            every accumulator of every merge in host memory (pinned with CUDA; the
            local shard's for ``DTensor`` params), none on the GPU. At a
            checkpoint the params are copied to a host staging buffer on a
            side stream and a host worker thread folds them; ``step()`` does
            not wait for the fold. Readouts then return host (CPU) tensors,
            ``merged_weights()`` copies them in one tensor at a time. Not with
            ``capturable=True`` or ``overlap=True``.
        moments: ``None`` (default): exact merges. An int ``m`` in 1..8: a
            *moment merge* that keeps ``m`` fp32 accumulators per parameter
            instead of one and is read with any decay shape chosen afterwards
            (readouts' ``shape=``; ``schedule`` is the default one), over the
            window from its anchor to the current step. Linear and 1-sqrt are
            exact from ``m = 2``; other shapes within the error bound that
            :meth:`shape_fit` reports (``docs/moments.md``). Also a key of
            ``merges=`` entries. Not with ``nonfinite="skip"``.

    Counting: only calls of :meth:`step` count. A step that
    ``torch.amp.GradScaler`` skips for inf/NaN gradients never calls it with an
    unfused inner optimizer; with a fused one (``fused=True``) GradScaler calls
    it and the inner step leaves the params unchanged, so it counts as a step
    without progress. Until the first :meth:`step` (or :meth:`load_state_dict`),
    a backward pass that finds the params moved since the previous one, with no
    ``WSMOptimizer`` stepped in between, raises ``RuntimeError``: another
    optimizer is stepping them (e.g. the Hugging Face ``Trainer`` with
    DeepSpeed drops an optimizer given in ``optimizers=``; use ``wrap_trainer``).

    Memory: one fp32 accumulator per parameter and merge (two with ``keep_last``;
    float64 for float64 params), allocated at the first :meth:`step` (or
    ``state_dict``/``load_state_dict``) on the params' device of that time, and
    moved with a param that changes device afterwards.

    Distributed: with ``DTensor`` params (FSDP2 ``fully_shard``, tensor
    parallel) the accumulators are ``DTensor`` s sharded like their param and every
    update runs on the local shards, with no communication; DDP needs nothing
    special. ``merged_state_dict(full=True, rank0_only=True)`` gathers; the
    state dict works with ``torch.distributed.checkpoint``.
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        schedule: schedules.Schedule = "linear",
        window: int | None = None,
        interval: int = 1,
        start: int = 0,
        backend: str = "auto",
        *,
        keep_last: bool = False,
        merges: Mapping[str, MergeSpec | Mapping[str, Any]] | None = None,
        model: nn.Module | None = None,
        nonfinite: str = "raise",
        overlap: bool = False,
        capturable: bool = False,
        offload: str | None = None,
        merge_buffers: bool = False,
        moments: int | None = None,
    ) -> None:
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"inner must be a torch.optim.Optimizer, got {type(inner).__name__}")
        if isinstance(inner, WSMOptimizer):
            raise TypeError("inner is already a WSMOptimizer; use merges= to track several merges")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__} {model!r}")
        options = WSMOptions(schedule=schedule, window=window, interval=interval, start=start, backend=backend,
                             keep_last=keep_last, merges=merges, nonfinite=nonfinite, overlap=overlap,
                             capturable=capturable, offload=offload, merge_buffers=merge_buffers, moments=moments)
        specs = options.merge_specs()
        buffers = ModelBuffers.opted_in(model, check_bool("merge_buffers", merge_buffers))
        self.inner = inner
        self.model = model
        self._init_hooks()
        self._runtime = Runtime.create(
            specs, inner.param_groups, backend=backend, nonfinite=nonfinite, overlap=overlap, capturable=capturable,
            offload=offload, model_buffers=buffers,
        )
        self._bypass = BypassGuard(self, inner.param_groups)  # last: a refused constructor leaves no hooks

    def _init_hooks(self) -> None:
        # What torch.optim.Optimizer.__init__ sets up, minus param_groups/state (the inner optimizer's).
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    # --------------------------------------------------- torch.optim interface
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        engine = self._runtime.engine
        if engine is not None and engine.steps_per_group:
            engine.cut(self.inner.param_groups, groups)
        else:
            callers.refuse_group_cut(self.inner.param_groups, groups)
        self.inner.param_groups = groups
    state, defaults = _inner_attribute("state"), _inner_attribute("defaults")
    _bypass: BypassGuard | None = None  # copies and unpickled optimizers have none

    @property
    def _step_supports_amp_scaling(self) -> bool:  # GradScaler's fused path (fused=True inner optimizers)
        return bool(getattr(self.inner, "_step_supports_amp_scaling", False))

    # GradScaler's fused path sets these on the optimizer it steps (AttributeError while unset, as it
    # expects); the inner step reads them.
    grad_scale, found_inf = _inner_attribute("grad_scale"), _inner_attribute("found_inf")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._runtime.add_param_group(self.inner, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        # an LR scheduler wraps ``step`` on the instance, bound to this object: a copy uses its class step;
        # a copy has its own params: the original's bypass guard does not follow it
        return {k: v for k, v in self.__dict__.items() if k not in ("step", "_opt_called", "_bypass")}

    def __repr__(self) -> str:
        merges = ", ".join(repr(m) for m in self._runtime.named)
        return f"WSMOptimizer({merges}; backend={self.backend})\n{self.inner!r}"

    # ------------------------------------------------------------------ step
    def step(self, closure=None):  # type: ignore[override]
        """Run the inner step, then fold the new params into every merge at a checkpoint.

        Returns whatever the inner step returned. Before the inner step, merges
        whose window is complete (or whose ``start`` is reached) are anchored at
        the current params; the finished window's merge stays readable until then.
        Safe under ``torch.compile``: the WSM bookkeeping runs eagerly, outside
        the compiled graph, so every step counts and nothing recompiles per step.
        """
        engine = self._runtime.engine
        if engine is not None and engine.whole is not None:
            return self._step_group(engine, closure)
        if self._begin_step():  # DCP's state-initialising call: not a WSM step
            with torch.no_grad():
                return self.inner.step()
        loss = self._inner_step(closure)
        self._end_step()
        return loss

    def _inner_step(self, closure):
        if closure is None:
            with torch.no_grad():
                return self.inner.step()
        return self.inner.step(closure)

    def _step_group(self, engine: EngineBinding, closure):
        """One group's step of an engine that steps per group: a merge step once every group is stepped."""
        if not engine.stepped and self._begin_step(engine.whole):
            with torch.no_grad():
                return self.inner.step()
        loss = self._inner_step(closure)
        if engine.round_done(self.inner.param_groups):
            self._end_step()
        return loss

    @torch.compiler.disable  # host bookkeeping: under torch.compile it runs eagerly, every step
    @torch.no_grad()
    def _begin_step(self, groups: list[dict[str, Any]] | None = None) -> bool:
        rt = self._runtime
        if rt.swapped:
            raise RuntimeError("step() called inside merged_weights(): the live params are swapped out")
        rt.fence()  # the previous checkpoint's reads of the params come before the inner step changes them
        if callers.called_by_state_init():
            return True
        count_step()
        if self._bypass is not None:
            self._bypass.disarm()
        callers.run_step_checks(self)
        rt.follow_params(self.inner.param_groups if groups is None else groups)
        rt.check_step()
        rt.anchor_windows()
        return False

    @torch.compiler.disable
    @torch.no_grad()
    def _end_step(self) -> None:
        rt = self._runtime
        rt.count_step()
        rt.fold()
        rt.capture_buffers()
        rt.registry.record_versions()

    def sync_steps(self) -> int:
        """Capturable mode: adopt the device step count after CUDA-graph replays (one host sync)."""
        return self._runtime.sync_steps()

    # ---------------------------------------------------------------- readout
    def merged_state_dict(
        self,
        dtype: torch.dtype | None = None,
        *,
        model: nn.Module | None = None,
        merge: str | None = None,
        completed: bool = False,
        full: bool = False,
        rank0_only: bool = False,
        cpu_offload: bool = False,
        shape: schedules.Schedule | Sequence[schedules.Schedule] | None = None,
    ) -> dict[str, Tensor]:
        """The merged model ``M_t = theta_anchor - sum_{i<=t} w_i g_i`` of the current window.

        Right after a window's last step this is exactly the explicit merge of
        its ``k + 1`` checkpoints. With ``interval > 1``, between two
        checkpoints the live params stand in for the next checkpoint, with its
        weight ``w_{t+1}`` (weights still sum to 1). Before the first window is
        anchored the merged model is the live model. Streamed one tensor at a
        time: peak memory is the output plus about one fp32 copy of the
        largest param.

        Args:
            dtype: output dtype, a floating ``torch.dtype`` (strings are not
                accepted); ``None`` keeps each param's dtype, ``torch.float32``
                returns the accumulator's precision. Complex params need a
                complex dtype (or ``None``).
            model: return a complete ``model.state_dict()``-style dict (buffers
                and frozen params from ``model``) that
                ``model.load_state_dict(..., strict=True)`` accepts. Params
                this optimizer tracks are matched by identity, else by name (a
                ``deepcopy`` of the model); other trainable params are refused.
                Defaults to the ``model`` given to the constructor.
            merge: which merge, when several are tracked.
            completed: the last *completed* window instead of the current one:
                available while a finished window has not been replaced yet
                (until the next ``step()``), and at any time with ``keep_last=True``.
            full: gather ``DTensor`` values (FSDP2 / TP) into plain full tensors,
                one tensor at a time (a collective: every rank must call it).
                ``False``: ``DTensor`` values sharded like the params, without
                communication, ready for ``torch.distributed.checkpoint.save``.
            rank0_only: with ``full=True``, only global rank 0 keeps the result;
                the other ranks join the gathers and get ``{}``.
            cpu_offload: with ``full=True``, move each gathered tensor to CPU at once.
            shape: a moment merge (``moments=``) only: the decay shape to read
                it with, a name of :data:`wsm_optim.schedules.SHAPES` or a
                callable ``f(t)``; ``None``: its ``schedule``. A list of shapes
                returns ``{schedule_name(shape): state dict}``. The window read
                ends now: right after a checkpoint it holds the checkpoints
                since the anchor; between two checkpoints (``interval > 1``)
                the live params are its newest point. Warns
                :class:`~wsm_optim.core.moments.MomentFitWarning` when the
                shape's error bound exceeds ``moments.TOLERANCE``.

        Returns:
            ``{name: tensor}`` of new tensors (not views of live state). Without
            ``model`` the keys are the ``param_names`` the inner optimizer got
            from ``named_parameters()``; with neither, ``ValueError``.

        Warns :class:`~wsm_optim.core.readout.LiveParamsChangedWarning` when the
        current window's readout uses live params that were edited since the
        last ``step()``.
        """
        if isinstance(shape, (list, tuple)):
            if not shape:
                raise ValueError("shape: an empty list; give one shape or a non-empty list of shapes")
            kwargs = dict(model=model, merge=merge, completed=completed, full=full, rank0_only=rank0_only,
                          cpu_offload=cpu_offload)
            return {schedules.schedule_name(s): self.merged_state_dict(dtype, shape=s, **kwargs) for s in shape}
        with readout.held_live_in(self._runtime):
            return readout.state_dict(
                self._runtime, merge, self.inner.param_groups, dtype=dtype,
                model=model if model is not None else self.model, completed=check_bool("completed", completed),
                full=full, rank0_only=rank0_only, cpu_offload=cpu_offload, shape=shape,
            )

    @contextlib.contextmanager
    def merged_weights(self, *, merge: str | None = None, completed: bool = False,
                       shape: schedules.Schedule | None = None):
        """Swap the merged values into the live params for the ``with`` block.

        ``shape``: the decay shape a moment merge is read with (one shape; see
        :meth:`merged_state_dict`).

        The live values are restored bit-exactly on exit, also on exception.
        Under FSDP2, pass ``model=`` to the optimizer: the model's FSDP modules
        are then resharded before and after the block, so neither an earlier
        evaluation's all-gathered params nor the merged ones outlive it (FSDP2
        keeps the root's params all-gathered after a forward without backward).
        Costs one copy of the params (in their dtype) plus one fp32 copy of the
        largest param while inside. ``step()`` raises inside the block.

        Thread safety: one swap at a time per optimizer; a second
        ``merged_weights()`` (nested, or from another thread while one is
        active) raises ``RuntimeError`` at once, and ``step()`` raises while a
        swap is active. Nothing else is thread-safe, as for any
        ``torch.optim.Optimizer``: do not step and read from two threads.
        """
        completed = check_bool("completed", completed)
        _one_shape(shape, "merged_weights()")
        core_swap = functools.partial(readout.swapped, self._runtime, merge, self.inner.param_groups, completed,
                                      shape)
        engine = self._runtime.engine
        with distributed.resharded(self.model), readout.held_live_in(self._runtime):
            if engine is not None and engine.merged_weights is not None:
                with engine.merged_weights(core_swap) as value:
                    yield value
            else:
                with core_swap():
                    yield self

    def _hold_live(self) -> None:
        """The hook for a trainer that loads other weights into the model at the end (not user API).

        Keeps the live params on the host as the readouts' live terms until the
        next step or :meth:`load_state_dict` (:func:`wsm_optim.core.readout.hold_live`);
        the Hugging Face ``Trainer`` integration calls it before ``load_best_model_at_end``.
        """
        readout.hold_live(self._runtime, self.inner.param_groups)

    def _release_live(self) -> None:
        """Drop what :meth:`_hold_live` kept: readouts use the live params again."""
        self._runtime.held_live = None

    def _bind_engine(self, *, merged_weights: Callable[[Callable[[], Any]], Any] | None = None,
                     drop_model: bool = False, steps_per_group: bool = False) -> None:
        """The hook for an engine integration that re-homes the params (not user API; DeepSpeed's ``attach``).

        An engine that replaces the tracked params with its own (DeepSpeed ZeRO's
        flat fp32 partitions) calls this once. ``merged_weights(core_swap)``
        replaces :meth:`merged_weights` (see :class:`~wsm_optim.core.runtime.EngineBinding`);
        ``drop_model=True`` forgets the constructor's ``model``, whose params
        are no longer the tracked ones (readouts are keyed by ``param_names``).
        ``steps_per_group=True``: the engine steps one param group at a time
        (``param_groups`` cut to it); one merge step counts once every group
        was stepped, instead of the cut being refused.
        Copies of the optimizer do not keep the binding.
        """
        self._runtime.engine = EngineBinding(merged_weights, steps_per_group)
        if drop_model:
            self.model = None

    def save_merged(self, path, dtype: torch.dtype | None = None, *, model: nn.Module | None = None,
                    merge: str | None = None, completed: bool = False, shape: schedules.Schedule | None = None):
        """Write :meth:`merged_state_dict` to ``path`` crash-safely; returns the ``Path``.

        ``shape``: the decay shape a moment merge is read with (one shape).

        safetensors by default; ``.pt``/``.pth``/``.bin`` use ``torch.save``.
        Written via :func:`wsm_optim.io.atomic_save` (temp file, fsync,
        ``os.replace``): a crash never leaves a partial file under ``path``.
        """
        from ..common.atomic import atomic_save

        _one_shape(shape, "save_merged()")
        return atomic_save(self.merged_state_dict(dtype, model=model, merge=merge, completed=completed, shape=shape),
                           path)

    # ------------------------------------------------------------- inspection
    @property
    def merges(self) -> tuple[str, ...]:
        """Names of the tracked merges (exact and moment merges, as given)."""
        return tuple(m.name for m in self._runtime.named)

    def is_moment_merge(self, merge: str | None = None) -> bool:
        """Whether the merge ``merge`` is a moment merge (``moments=``), read with any ``shape=``."""
        return isinstance(self._runtime.merge(merge), MomentMerge)

    def shape_fit(self, shape: schedules.Schedule | None = None, *, merge: str | None = None,
                  completed: bool = False) -> ShapeFit:
        """How closely a moment merge's moments reconstruct ``shape`` over the window a readout reads now.

        Returns a :class:`~wsm_optim.core.moments.ShapeFit`: ``error`` is the
        relative bound ``sum |w_i - w_hat_i| / sum w_i`` of the decay weights
        (0 up to float64 rounding for linear and 1-sqrt), from the weights
        alone: no data, no host sync. ``shape=None``: the merge's schedule.
        """
        chosen = self._runtime.merge(merge)
        if not isinstance(chosen, MomentMerge):
            raise ValueError(f"shape_fit: merge {chosen.name!r} is an exact merge; it needs a moment merge (moments=m)")
        return chosen.fit(shape, check_bool("completed", completed))

    @property
    def steps(self) -> int:
        """Counted optimizer steps since wrapping (restored by ``load_state_dict``)."""
        return self._runtime.steps

    @property
    def backend(self) -> str:
        """The update backend in use: ``"foreach"``, ``"triton"`` or ``"offload"`` (``offload="cpu"``)."""
        return self._runtime.backend.name

    def merge_status(self, merge: str | None = None) -> dict[str, Any]:
        """Counters of one merge (see :meth:`wsm_optim.core.window.Position.status`)."""
        return self._runtime.merge(merge).position.status()

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Inner state plus WSM accumulators and counters (format: ``wsm_optim.core.persistence``).

        Tensors in the result are references to the live accumulators, as with
        ``torch.optim``: ``torch.save`` or ``copy.deepcopy`` it for a snapshot.
        State-dict hooks registered on the wrapper run around it.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        self._runtime.join()
        self._runtime.follow_params(self.inner.param_groups)
        sd = persistence.save(self._runtime, self.inner)
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore inner state, accumulators and counters; a bad dict raises ``ValueError`` and changes nothing.

        Accepts this class's :meth:`state_dict` (any release), also after
        ``torch.distributed.checkpoint`` re-keyed it by parameter name. Raises
        ``ValueError`` naming the field if the saved merges differ from this
        optimizer's (names, schedule, weights, window, interval, start).
        """
        state_dict = dict(state_dict)  # shallow copy, as torch.optim does
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._runtime.join()
        persistence.load(self._runtime, self.inner, state_dict)
        self._runtime.held_live = None  # the loaded state goes with the params the caller holds now
        if self._bypass is not None:  # a resumed optimizer is wired by hand; copies loaded to inspect need no guard
            self._bypass.disarm()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

