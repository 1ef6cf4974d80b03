"""Distributed glue for ``WSMOptimizer``: DTensor (FSDP2 / TP) shards, full gathers, DCP.

Nothing here communicates during training. The rules:

* A ``DTensor`` parameter gets ``DTensor`` accumulators with the same mesh,
  placements, global shape and stride (``torch.zeros_like`` keeps them).
* The update backends never see a ``DTensor``: the optimizer hands them the
  ``to_local()`` views of params and accumulators (:func:`local_view`). WSM
  updates are elementwise, so each rank updating its own shard is exact and
  needs no collective, whatever the placements (``Shard``, ``Replicate``, 2-D
  meshes; a ``Partial`` parameter is refused, it has no meaningful local value).
* Readouts are wrapped back into ``DTensor`` s sharded like the params
  (:func:`wrap_like`), ready for ``torch.distributed.checkpoint.save``. Only
  the opt-in full gather (:func:`gather_full`) communicates, one tensor at a time.

DCP's state-initialising ``step()`` call is recognised in :mod:`wsm_optim.core.callers`.

A swap of merged values into FSDP2 shards (``merged_weights``) must reshard the
modules first and after (:func:`resharded`): see there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from ..common.text import a

__all__ = [
    "is_dtensor",
    "local_view",
    "wrap_like",
    "check_copy",
    "copy_into",
    "gather_full",
    "get_rank",
    "resharded",
]

try:  # torch.distributed may be absent from a build (e.g. some macOS wheels).
    from torch.distributed.tensor import DTensor, Partial, Shard
except ImportError:  # pragma: no cover - exercised only on builds without distributed
    DTensor = Partial = Shard = None  # type: ignore[assignment,misc]


def is_dtensor(t: Tensor) -> bool:
    """True for ``torch.distributed.tensor.DTensor`` (FSDP2 / TP parameters)."""
    return DTensor is not None and isinstance(t, DTensor)


def local_view(t: Tensor) -> Tensor:
    """The tensor the update backends operate on: ``t.to_local()`` for a ``DTensor``, else ``t``.

    Under ``torch.no_grad()`` ``to_local()`` returns the DTensor's own local
    tensor, so in-place updates of the view update the DTensor (no copy).
    Raises ``ValueError`` for a ``Partial`` placement: such a tensor's local
    value is a summand of the global one, not a shard of it.
    """
    if not is_dtensor(t):
        return t
    if any(isinstance(pl, Partial) for pl in t.placements):
        raise ValueError(
            f"WSMOptimizer: a DTensor parameter with placements {t.placements} has a Partial "
            "placement; only Shard and Replicate placements can be merged shard-locally"
        )
    with torch.no_grad():
        return t.to_local()


def wrap_like(p: Tensor, local: Tensor) -> Tensor:
    """Wrap a local result computed from ``local_view(p)`` back into ``p``'s layout.

    Plain ``p``: returns ``local``. ``DTensor`` ``p``: a ``DTensor`` with ``p``'s
    mesh, placements, global shape and stride whose local tensor is ``local``
    (no communication, no copy; ``local`` may have another dtype).
    """
    if not is_dtensor(p):
        return local
    return DTensor.from_local(
        local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )


def check_copy(dst: Tensor, src: Tensor, what: str, *, finite: bool = False) -> None:
    """Raise ``ValueError`` (naming ``what``) unless :func:`copy_into` can copy ``src`` into ``dst``.

    ``dst`` may be a parameter standing in for its accumulator: the shape and
    the layout (plain or ``DTensor``, mesh, placements) are compared, and the
    values must fit it: real for a real ``dst`` (copying a complex tensor into
    it would drop the imaginary part) and, with ``finite``, free of NaN/inf
    (where training cannot have put them, a loaded one would later be blamed
    on the checkpoints or the live params).
    """
    _check_layout(dst, src, what)
    if src.dtype.is_complex and not dst.dtype.is_complex:
        raise ValueError(f"load_state_dict: {what} is complex ({src.dtype}) but the parameter is real ({dst.dtype})")
    if not finite:
        return
    values = local_view(src)
    values = torch.view_as_real(values) if values.is_complex() else values
    bad = values.numel() - int(torch.isfinite(values).sum())
    if bad:
        raise ValueError(
            f"load_state_dict: {what} holds {bad} NaN/inf value{'s' if bad != 1 else ''}; with "
            "nonfinite='skip' no non-finite checkpoint reaches a merge's buffers, so the state dict is corrupt"
        )


def _check_layout(dst: Tensor, src: Tensor, what: str) -> None:
    if not isinstance(src, Tensor):
        raise ValueError(f"load_state_dict: {what} is {a(type(src).__name__)}, expected a tensor")
    if src.device.type == "meta":
        raise ValueError(f"load_state_dict: {what} is a meta tensor (no values to load)")
    if not (src.dtype.is_floating_point or src.dtype.is_complex):
        raise ValueError(f"load_state_dict: {what} has dtype {src.dtype}, expected a floating point tensor")
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(
            f"load_state_dict: {what}: accumulator shape mismatch: saved {tuple(src.shape)}, "
            f"parameter {tuple(dst.shape)}"
        )
    if is_dtensor(dst) and is_dtensor(src):
        if src.device_mesh != dst.device_mesh or tuple(src.placements) != tuple(dst.placements):
            raise ValueError(
                f"load_state_dict: {what} is a DTensor with mesh/placements "
                f"{src.device_mesh}/{src.placements}, parameter has {dst.device_mesh}/"
                f"{dst.placements}; load with torch.distributed.checkpoint to reshard"
            )
    elif is_dtensor(src):
        raise ValueError(
            f"load_state_dict: {what} is a DTensor but the parameter is a plain tensor; "
            "load sharded checkpoints with torch.distributed.checkpoint, which converts layouts"
        )


def copy_into(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)`` for accumulators restored from a state dict, without communication.

    ``dst`` is a (possibly ``DTensor``) accumulator. ``src`` may be a ``DTensor``
    laid out like ``dst`` (DCP, or a ``torch.save`` of a sharded state dict at the
    same world size) or a plain tensor of the *global* shape (a full,
    gathered state dict): each rank then copies its own slice of it.
    Check first with :func:`check_copy`.
    """
    if src is dst:
        return
    _check_layout(dst, src, "accumulator")
    if is_dtensor(dst):
        if is_dtensor(src):
            dst.to_local().copy_(src.to_local())
        else:
            from torch.distributed.tensor import distribute_tensor

            # src_data_rank=None: every rank holds the full tensor and slices its
            # own shard locally; no scatter.
            shard = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements, src_data_rank=None)
            dst.to_local().copy_(shard.to_local())
        return
    dst.copy_(src)


def get_rank() -> int:
    """This process's global rank, 0 when ``torch.distributed`` is not initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def gather_full(value: Tensor, *, rank0_only: bool, cpu_offload: bool) -> Tensor | None:
    """Materialise one readout tensor as a plain full tensor, or ``None`` where it is not kept.

    ``value``: a ``DTensor`` (gathered: a collective every rank of its mesh must
    join, in the same order) or a plain tensor (DDP / single process: already
    full, returned as is). ``rank0_only``: only global rank 0 keeps the result;
    for a ``DTensor`` on a 1-D mesh with one plain ``Shard(d)`` placement (FSDP2,
    TP) the shards are then sent to rank 0 with ``gather`` so the other ranks
    never hold a full tensor; otherwise ``full_tensor()`` (all-gather) is used
    and the other ranks drop their copy. ``cpu_offload``: move a kept result to
    CPU. Transient cost: about one full tensor plus the backend's buffers.
    """
    if not is_dtensor(value):
        full: Tensor | None = value if not rank0_only or get_rank() == 0 else None
    elif rank0_only and _gatherable_to_rank0(value):
        full = _gather_shards_to_rank0(value)
    else:
        full = value.full_tensor()
        if rank0_only and get_rank() != 0:
            full = None
    if full is not None and cpu_offload and full.device.type != "cpu":
        full = full.cpu()
    return full


def _gatherable_to_rank0(value: Tensor) -> bool:
    mesh = value.device_mesh
    return (
        mesh.ndim == 1
        and len(value.placements) == 1
        and type(value.placements[0]) is Shard  # not _StridedShard (FSDP2 + TP): another layout
        and bool((mesh.mesh == 0).any())
    )


def _gather_shards_to_rank0(value: Tensor) -> Tensor | None:
    """Full tensor of a 1-D-mesh ``Shard(d)`` DTensor on global rank 0 (``None`` elsewhere).

    DTensor shards follow ``torch.chunk``: every rank's shard has ``ceil(n / world)``
    rows along ``d`` except trailing ranks, which have fewer or none. Each rank
    pads its shard to that size, rank 0 gathers them and drops the padding, which
    then sits at the end of the concatenation.
    """
    mesh, dim = value.device_mesh, value.placements[0].dim % value.ndim
    world, n = mesh.size(), value.shape[dim]
    chunk = -(-n // world)
    local = value.to_local()
    padded_shape = list(local.shape)
    padded_shape[dim] = chunk
    if local.shape[dim] == chunk:
        send = local.contiguous()
    else:
        send = local.new_zeros(padded_shape)
        send.narrow(dim, 0, local.shape[dim]).copy_(local)
    root = get_rank() == 0
    outputs = None
    if root:
        if dim == 0:  # gather straight into the rows of one buffer
            buffer = local.new_empty([chunk * world, *padded_shape[1:]])
            outputs = list(buffer.chunk(world))
        else:
            outputs = [local.new_empty(padded_shape) for _ in range(world)]
    torch.distributed.gather(send, outputs, dst=0, group=mesh.get_group())
    if not root:
        return None
    if dim == 0:
        return buffer if chunk * world == n else buffer.narrow(0, 0, n).clone()
    return torch.cat(outputs, dim=dim).narrow(dim, 0, n).contiguous()


def _fsdp_modules(model: torch.nn.Module | None) -> list:
    if model is None:
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - builds without distributed
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def resharded(model: torch.nn.Module | None) -> Iterator[None]:
    """Every FSDP2 module of ``model`` resharded before the block and after it (nothing without FSDP2).

    A forward without a backward (an evaluation) leaves the modules FSDP2 does
    not reshard after forward (the root, by default) holding their all-gathered
    params, and their next forward uses those as they are. A swap writes into
    the shards only: without a reshard, an evaluation inside ``merged_weights``
    right after a live one would run on the live values, and the first training
    step after the block on the merged ones.
    """
    modules = _fsdp_modules(model)
    for m in modules:
        m.reshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
