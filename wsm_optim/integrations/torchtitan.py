"""torchtitan (0.3.0): WSM in one config entry, checkpointed and resharded by torchtitan's checkpointer.

One line in a torchtitan config function (``config_registry.py``) or training script::

    from wsm_optim.integrations.torchtitan import with_wsm

    config.optimizer = with_wsm(default_adamw(lr=8e-4), schedule="1-sqrt", window=1000)

``with_wsm`` turns an ``OptimizersContainer.Config`` into a
:class:`WSMOptimizersContainer.Config`; torchtitan's ``Trainer`` builds it with
``config.optimizer.build(model_parts=...)`` like any optimizer config, and gets
a :class:`WSMOptimizersContainer`: torchtitan's ``OptimizersContainer`` with
every optimizer it builds (one per model part and optimizer type) wrapped in
:class:`~wsm_optim.WSMOptimizer`.

What it changes, and why:

* Checkpoints. torchtitan's ``CheckpointManager`` saves the container's flat,
  FQN-keyed state dict (``state.<param fqn>.<name>``,
  ``param_groups.<param fqn>.<key>``) with DCP. The WSM accumulators sit there
  as ``state.<fqn>.wsm_acc.<merge>`` and ``wsm_origin.<merge>`` (``DTensor`` s sharded like their param
  under FSDP2 / TP, so DCP reshards them on a change of world size) and the
  counters as ``param_groups.<fqn>.wsm``. torchtitan's own unflattening reads
  back only the keys the *inner* optimizer's live state has, so it would drop
  both; :meth:`WSMOptimizersContainer.load_state_dict` restores everything the
  WSM state dict holds.
* ``init_optim_state``. torchtitan materialises an empty optimizer state with
  a zero-gradient step at ``lr = 0`` before every save and load
  (``torchtitan.components.optimizer.utils.init_optim_state``). Called on a
  ``WSMOptimizer`` that step would count as a merge step and fold a checkpoint
  into the window. The container runs it on the inner optimizer instead, so it
  never counts; called on a ``WSMOptimizer`` directly (torchtitan's torchft
  optimizer does), it is recognised as DCP's same step is, and does not count either.

Readouts over all model parts: :meth:`~WSMOptimizersContainer.merged_state_dict`
(keyed by the optimizer's param FQNs), :meth:`~WSMOptimizersContainer.merged_weights`,
:meth:`~WSMOptimizersContainer.merged_model_state_dict` (the model's own
``state_dict`` keys, what torchtitan's checkpoint holds under ``model``),
:meth:`~WSMOptimizersContainer.merged_hf_state_dict` (through the model's
state-dict adapter) and :meth:`~WSMOptimizersContainer.save_merged_hf` (the
way torchtitan writes ``last_save_in_hf`` checkpoints).

torchtitan's ``Trainer`` itself needs a CUDA (or other accelerator) device:
without one its device falls back to ``"cuda"``. The tests
(``tests/test_integrations_torchtitan.py``) therefore drive its components
directly on CPU with gloo: a llama3 model from its registry, its
``parallelize_llama`` (FSDP2), this container, ``LRSchedulersContainer`` and
``CheckpointManager``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torchtitan.components.checkpoint import AsyncMode, CheckpointManager, ModelWrapper
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.components.optimizer.utils import get_flat_optim_state_dict, init_optim_state

from ..common.text import a
from ..core.backends import BACKEND_NAMES
from ..core.distributed import resharded
from ..core.optimizer import WSMOptimizer
from ..core.spec import NONFINITE_MODES, OFFLOAD_CHOICES, WSMOptions
from ..schedules import Schedule

__all__ = ["WSMConfig", "WSMOptimizersContainer", "with_wsm"]


@dataclass(kw_only=True, slots=True)
class WSMConfig:
    """The merge(s) every optimizer of the container keeps; see :class:`~wsm_optim.WSMOptimizer`.

    Validated when the config is created, so a bad value fails before any model is built.
    """

    schedule: Schedule = "linear"
    """Decay shape: a name of ``wsm_optim.schedules.SHAPES`` ("linear", "1-sqrt", ...), a callable f(t), or w_1..w_k."""

    window: int | None = None
    """Optimizer steps per merge window (required unless ``merges`` is given)."""

    interval: int = 1
    """Steps between checkpoints; ``window`` must be a multiple of it."""

    start: int = 0
    """Steps before the first window is anchored (the live model is the merge until then)."""

    keep_last: bool = False
    """Keep the last completed window's merge (one more fp32 accumulator per param)."""

    merges: dict[str, dict[str, Any]] | None = None
    """Several merges, ``{name: dict(schedule=..., window=..., ...)}``, instead of the fields above."""

    nonfinite: Literal[NONFINITE_MODES] = "raise"
    """NaN/inf policy of the merge (``WSMOptimizer(nonfinite=...)``)."""

    backend: Literal[BACKEND_NAMES] = "auto"
    """Update backend (``"auto"``: Triton on CUDA, foreach otherwise)."""

    overlap: bool = False
    """CUDA only: fold checkpoints on a side stream, overlapping the next forward/backward."""

    capturable: bool = False
    """Launch the update every step so a step can be captured in a CUDA graph (Triton backend)."""

    offload: Literal[OFFLOAD_CHOICES] = None
    """``"cpu"``: every accumulator in host memory, folded by a worker thread (``WSMOptimizer(offload=...)``)."""

    merge_buffers: bool = False
    """Also merge each model part's persistent floating-point buffers (MoE ``expert_bias_E``, normalisation
    statistics) with the same weights; integer and non-persistent ones (``tokens_per_expert_E``) stay live."""

    moments: int | None = None
    """A moment merge with this many accumulators per param, read with any decay shape afterwards (``shape=``)."""

    def __post_init__(self) -> None:
        options = self.options()
        options.merge_specs()
        # WSMOptimizer's own rules and messages, naming the config field (a bad value would
        # otherwise surface only when torchtitan builds the optimizers, far from the config)
        try:
            options.check()
        except (TypeError, ValueError) as error:
            raise type(error)(f"WSMConfig.{error}") from None

    def options(self) -> WSMOptions:
        """These fields as ``WSMOptimizer``'s option set."""
        return WSMOptions(**{f.name: getattr(self, f.name) for f in fields(WSMOptions)})

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``WSMOptimizer(inner, **kwargs)``, but ``merge_buffers`` (applied per model part)."""
        kwargs = self.options().kwargs()
        del kwargs["merge_buffers"]
        return kwargs


class WSMOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` whose optimizers each keep a WSM merge.

    ``self.optimizers`` holds one :class:`~wsm_optim.WSMOptimizer` per optimizer
    torchtitan builds (per model part and optimizer type), each wrapping the
    optimizer torchtitan built, with the param FQNs torchtitan records in
    ``param_names``. ``step``, ``zero_grad`` and step hooks are the base
    class's; torchtitan's ``LRSchedulersContainer`` wraps the ``WSMOptimizer`` s.

    Args:
        config: :class:`WSMOptimizersContainer.Config` (``with_wsm`` makes one
            from an ``OptimizersContainer.Config``).
        model_parts: the model parts to optimize, after parallelisation.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        wsm: WSMConfig
        """The merge(s) to keep; see :class:`WSMConfig`."""

    optimizers: list[WSMOptimizer]

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        if not isinstance(getattr(config, "wsm", None), WSMConfig):
            raise TypeError(
                f"config.wsm must be a WSMConfig, got {type(getattr(config, 'wsm', None)).__name__}; "
                "build the config with with_wsm(optimizer_config, window=...)"
            )
        super().__init__(config, model_parts=model_parts)
        kwargs = config.wsm.optimizer_kwargs()
        owners = _buffer_owners(self.optimizers, model_parts) if config.wsm.merge_buffers else {}
        wrapped = []
        for i, optimizer in enumerate(self.optimizers):
            part = owners.get(i)
            if part is None:
                wrapped.append(WSMOptimizer(optimizer, **kwargs))
                continue
            opt = WSMOptimizer(optimizer, **kwargs, model=part, merge_buffers=True)
            # Readouts stay keyed by param FQN (plus the buffers' names): a model part's own
            # state_dict() runs its hooks (fused wqkv split into wq/wk/wv), whose slices no
            # optimizer tracks; merged_model_state_dict reads that through merged_weights().
            opt._bind_engine(drop_model=True)
            wrapped.append(opt)
        self.optimizers = wrapped

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Flat, FQN-keyed state of all optimizers, WSM accumulators and counters included.

        Keys as torchtitan's: ``state.<fqn>.<name>`` (``wsm_acc.<merge>``,
        ``wsm_last.<merge>`` among them; live tensors, ``DTensor`` s under
        FSDP2 / TP) and ``param_groups.<fqn>.<key>`` (``wsm``: the counters).
        An empty inner state is materialised first, without counting a step.
        """
        result: dict[str, Any] = {}
        for optimizer in self.optimizers:
            _init_inner_state(optimizer)
            result.update(get_flat_optim_state_dict(optimizer))
        return result

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore every optimizer (inner state, WSM buffers, counters) from :meth:`state_dict`'s layout.

        Keys other optimizers own are ignored, as in torchtitan. A missing key
        raises ``KeyError`` naming it (a state saved without WSM lacks
        ``param_groups.<fqn>.wsm``; through ``CheckpointManager``, DCP already
        refuses it: ``Missing key in checkpoint state_dict:
        optimizer.state.<fqn>.wsm_acc.<merge>``); a WSM state that does not fit
        this optimizer's merges raises ``ValueError`` (see ``WSMOptimizer.load_state_dict``).
        """
        for optimizer in self.optimizers:
            _init_inner_state(optimizer)
            optimizer.load_state_dict(_unflatten(optimizer.state_dict(), state_dict))

    # --------------------------------------------------------------- readouts
    @property
    def merges(self) -> tuple[str, ...]:
        """Names of the tracked merges (the same in every optimizer)."""
        return self.optimizers[0].merges

    @property
    def steps(self) -> int:
        """Counted optimizer steps (every optimizer steps together)."""
        return self.optimizers[0].steps

    def merge_status(self, merge: str | None = None) -> dict[str, Any]:
        """Counters of one merge (the same in every optimizer); see ``WSMOptimizer.merge_status``."""
        return self.optimizers[0].merge_status(merge)

    def merged_state_dict(
        self,
        dtype: torch.dtype | None = None,
        *,
        merge: str | None = None,
        completed: bool = False,
        shape: Any = None,
        full: bool = False,
        rank0_only: bool = False,
        cpu_offload: bool = False,
    ) -> dict[str, Tensor]:
        """``{param fqn: merged value}`` over all optimizers (``WSMOptimizer.merged_state_dict``).

        Keys are the parameter FQNs torchtitan gives its optimizers (fused
        params such as ``attention.qkv_linear.wqkv.weight`` stay fused), then,
        with ``merge_buffers=True``, the merged buffers' names in their model
        part (``layers.0.moe.expert_bias_E``). Values
        are ``DTensor`` s sharded like the params, or with ``full=True`` plain
        full tensors (a collective: every rank calls it).
        """
        result: dict[str, Tensor] = {}
        for optimizer in self.optimizers:
            result.update(optimizer.merged_state_dict(
                dtype, merge=merge, completed=completed, shape=shape, full=full, rank0_only=rank0_only,
                cpu_offload=cpu_offload,
            ))
        return result

    @contextlib.contextmanager
    def merged_weights(self, *, merge: str | None = None, completed: bool = False, shape: Any = None) -> Iterator[None]:
        """Swap the merged values into the params of every model part for the ``with`` block.

        The live values are restored bit-exactly on exit, also on exception;
        ``step()`` raises inside the block. Costs one copy of the params.
        """
        with contextlib.ExitStack() as stack:
            for part in self.model_parts:  # FSDP2 modules resharded around the swap (see distributed.resharded)
                stack.enter_context(resharded(part))
            for optimizer in self.optimizers:
                stack.enter_context(optimizer.merged_weights(merge=merge, completed=completed, shape=shape))
            yield

    def merged_model_state_dict(
        self, *, merge: str | None = None, completed: bool = False, shape: Any = None,
        full: bool = False
    ) -> dict[str, Tensor]:
        """The merged model in the model parts' ``state_dict`` keys: what torchtitan saves under ``model``.

        Taken from ``model.state_dict()`` inside :meth:`merged_weights`, so the
        model's state-dict hooks apply (llama3's fused ``wqkv`` comes out as
        ``wq``, ``wk``, ``wv``); buffers are merged with ``merge_buffers=True``,
        else they come from the live model. Values are
        new tensors in each param's dtype: ``DTensor`` s as the params are
        laid out, or with ``full=True`` plain full tensors (a collective: every
        rank calls it, in the same order).
        """
        out: dict[str, Tensor] = {}
        with self.merged_weights(merge=merge, completed=completed, shape=shape):
            for part in self.model_parts:
                for key, value in part.state_dict().items():
                    if full and isinstance(value, DTensor):
                        out[key] = value.full_tensor()
                    else:
                        out[key] = value.detach().clone()
        return out

    def merged_hf_state_dict(
        self, sd_adapter: Any, *, merge: str | None = None, completed: bool = False, shape: Any = None,
        full: bool = False
    ) -> dict[str, Tensor]:
        """:meth:`merged_model_state_dict` in Hugging Face naming: ``sd_adapter.to_hf(...)``.

        ``sd_adapter``: the model's torchtitan state-dict adapter, e.g.
        ``model_spec.state_dict_adapter(model_config, hf_assets_path)`` or
        ``checkpointer.sd_adapter``.
        """
        if sd_adapter is None or not callable(getattr(sd_adapter, "to_hf", None)):
            raise TypeError(
                f"sd_adapter must be a torchtitan state-dict adapter with to_hf(), got {type(sd_adapter).__name__}"
            )
        return sd_adapter.to_hf(
            self.merged_model_state_dict(merge=merge, completed=completed, shape=shape, full=full)
        )

    def save_merged_hf(
        self, checkpointer: CheckpointManager, path: str, *, merge: str | None = None, completed: bool = False,
        shape: Any = None
    ) -> None:
        """Write the merged model as Hugging Face safetensors, the way torchtitan saves ``last_save_in_hf``.

        Runs ``checkpointer.dcp_save(..., to_hf=True)`` on the model parts'
        state dict (cast to the checkpoint's ``export_dtype``) inside
        :meth:`merged_weights`: the adapter's ``to_hf`` and DCP's
        ``HuggingFaceStorageWriter`` write ``path`` collectively (every rank calls it).
        """
        if not isinstance(checkpointer, CheckpointManager):
            raise TypeError(f"checkpointer must be a torchtitan CheckpointManager, got {type(checkpointer).__name__}")
        if not checkpointer.enable:
            raise ValueError("checkpointer is disabled (checkpoint.enable=False): it has no save path to reuse")
        if checkpointer.sd_adapter is None:
            raise ValueError(
                "checkpointer.sd_adapter is None: the model spec has no state-dict adapter, so there is no HF naming"
            )
        export = checkpointer.export_dtype
        with self.merged_weights(merge=merge, completed=completed, shape=shape):
            states = ModelWrapper(self.model_parts).state_dict()
            states = {
                k: v.to(export) if isinstance(v, Tensor) and v.is_floating_point() and v.dtype != export else v
                for k, v in states.items()
            }
            checkpointer.dcp_save(states, checkpoint_id=path, async_mode=AsyncMode.DISABLED, to_hf=True)


def with_wsm(optimizer: OptimizersContainer.Config, **wsm: Any) -> WSMOptimizersContainer.Config:
    """``optimizer`` (an ``OptimizersContainer.Config``) with WSM.

    ``config.optimizer = with_wsm(config.optimizer, schedule="1-sqrt", window=1000)``.

    Keeps every field of ``optimizer`` (param groups, implementation, ...);
    ``wsm`` are :class:`WSMConfig`'s fields, ``WSMOptimizer``'s options
    (:class:`~wsm_optim.core.spec.WSMOptions`: ``schedule``, ``window``,
    ``interval``, ``start``, ``keep_last``, ``merges``, ``backend``,
    ``nonfinite``, ``overlap``, ``capturable``, ``offload``, ``merge_buffers``, ``moments``), validated here.
    """
    if isinstance(optimizer, WSMOptimizersContainer.Config):
        raise TypeError("optimizer already has WSM (a WSMOptimizersContainer.Config); change its .wsm instead")
    if not isinstance(optimizer, OptimizersContainer.Config):
        raise TypeError(
            f"optimizer must be a torchtitan OptimizersContainer.Config (e.g. default_adamw(lr=...)), "
            f"got {type(optimizer).__name__}"
        )
    if type(optimizer) is not OptimizersContainer.Config:
        raise TypeError(
            f"optimizer is {a(type(optimizer).__qualname__)}, whose owner is another container class "
            f"than OptimizersContainer; with_wsm would drop its behaviour"
        )
    names = {f.name for f in fields(WSMConfig)}
    unknown = sorted(set(wsm) - names)
    if unknown:
        raise TypeError(f"with_wsm: unknown argument(s) {unknown}; allowed: {sorted(names)}")
    kept = {f.name: getattr(optimizer, f.name) for f in fields(optimizer) if f.init}
    return WSMOptimizersContainer.Config(**kept, wsm=WSMConfig(**wsm))


def _buffer_owners(optimizers: list[torch.optim.Optimizer], model_parts: list[nn.Module]) -> dict[int, nn.Module]:
    """``{optimizer index: model part}``: the first optimizer holding a part's params merges its buffers.

    torchtitan builds one optimizer per model part and optimizer type, so a
    part's buffers would otherwise be merged (and saved) once per optimizer.
    """
    part_of = {id(p): i for i, part in enumerate(model_parts) for p in part.parameters()}
    owners: dict[int, nn.Module] = {}
    taken: set[int] = set()
    for index, optimizer in enumerate(optimizers):
        parts = {part_of.get(id(p)) for g in optimizer.param_groups for p in g["params"]} - {None}
        if len(parts) > 1:
            raise ValueError(
                f"WSMConfig.merge_buffers=True: optimizer {index} holds params of model parts {sorted(parts)}; "
                "each part's buffers must be merged by one optimizer of that part"
            )
        part = next(iter(parts), None)
        if part is not None and part not in taken:
            taken.add(part)
            owners[index] = model_parts[part]
    return owners


def _init_inner_state(optimizer: WSMOptimizer) -> None:
    # torchtitan's zero-gradient, lr = 0 step, run on the inner optimizer so that
    # the wrapper never sees it (it would count as a merge step). Afterwards the
    # shared ``state`` is non-empty and torchtitan's own call on the wrapper is a no-op.
    init_optim_state(optimizer.inner)


def _unflatten(template: Mapping[str, Any], flat: Mapping[str, Any]) -> dict[str, Any]:
    """An integer-keyed state dict shaped like ``template`` (``WSMOptimizer.state_dict()``), values from ``flat``.

    ``flat`` uses ``get_flat_optim_state_dict``'s keys. Nested state values
    (dicts, e.g. Shampoo's) were flattened into dotted keys and are rebuilt.
    """
    fqn_of: dict[int, str] = {}
    groups: list[dict[str, Any]] = []
    for group in template["param_groups"]:
        fqns = group["param_names"]
        fqn_of.update(zip(group["params"], fqns))
        rebuilt = {"params": group["params"], "param_names": fqns}
        if fqns:
            for key in sorted(group, key=lambda k: k != "wsm"):  # a missing WSM entry is the error to report
                if key not in rebuilt:
                    rebuilt[key] = _lookup(flat, f"param_groups.{fqns[0]}.{key}", None)
        groups.append(rebuilt)
    state = {
        pid: {name: _lookup(flat, f"state.{fqn_of[pid]}.{name}", value) for name, value in entry.items()}
        for pid, entry in template["state"].items()
    }
    return {"state": state, "param_groups": groups}


def _lookup(flat: Mapping[str, Any], key: str, like: Any) -> Any:
    if key in flat:
        return flat[key]
    if isinstance(like, Mapping):
        return {name: _lookup(flat, f"{key}.{name}", value) for name, value in like.items()}
    raise KeyError(
        f"WSMOptimizersContainer.load_state_dict: the state dict has no {key!r}"
        + (" (a checkpoint saved without WSM, or with other merges)" if ".wsm" in key else "")
    )
