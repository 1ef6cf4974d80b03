"""One rank of the DeepSpeed tests (launched by tests/test_deepspeed.py with torchrun, gloo, CPU).

Usage: ``torchrun --nproc_per_node N tests/_deepspeed_worker.py OUT_DIR``. Runs every
case for ZeRO stages 1 and 2 in one launch (DeepSpeed's start-up dominates)
and writes ``OUT_DIR/plain-rank<r>.json`` with what each case measured; the test
asserts on it.
"""

import copy
import functools
import os
import sys

import torch
from torch import nn

import deepspeed
from deepspeed.utils import safe_get_full_fp32_param

sys.path.insert(0, os.path.dirname(__file__))
import reference  # noqa: E402
from _launch import run_cases  # noqa: E402

from wsm_optim import WSMOptimizer, unwrap  # noqa: E402
from wsm_optim.integrations import deepspeed as wds  # noqa: E402

SPEC = reference.Window(schedule="1-sqrt", window=4, interval=2)
STEPS = 9  # ends mid-window: the readout leans on the live masters
RANK = int(os.environ.get("RANK", 0))


def build(seed=0, batch_norm=False):
    torch.manual_seed(seed)
    if batch_norm:  # running statistics: merged with merge_buffers=True; num_batches_tracked: live
        return nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5, momentum=0.3), nn.Tanh(), nn.Linear(5, 3))
    # 7 * 5 + 5 + 5 * 3 + 3 = 58 params: not divisible by the partition count (uneven partitions, padding)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))


def groups(model):
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n.endswith("weight")]},
        {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
    ]


def engine_for(stage, seed=0, bf16=False, merge_buffers=False, one_group=False, checkpoint=None, **zero):
    model = build(seed, batch_norm=merge_buffers)
    buffers = dict(model=model, merge_buffers=True) if merge_buffers else {}
    params = model.parameters() if one_group else groups(model)
    wsm = WSMOptimizer(torch.optim.AdamW(params, lr=0.05, weight_decay=0.1), **SPEC.as_kwargs(), **buffers)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": stage, **zero},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        **({"checkpoint": checkpoint} if checkpoint else {}),
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=wsm, config=config)
    return engine, wsm


def batches(n, skip=0, shared=False):
    g = torch.Generator().manual_seed(100 + (0 if shared else RANK))
    out = [(torch.randn(4, 7, generator=g), torch.randn(4, 3, generator=g)) for _ in range(skip + n)]
    return out[skip:]


def train(engine, data):
    dtype = next(engine.module.parameters()).dtype
    for x, y in data:
        engine.backward(nn.functional.mse_loss(engine(x.to(dtype)).float(), y))
        engine.step()


def masters(engine):
    """The gathered fp32 masters, float64, in named_parameters order (DeepSpeed's own accessor)."""
    return [safe_get_full_fp32_param(p).to(torch.float64) for _, p in engine.module.named_parameters()]


def case_merge_equals_explicit_merge(stage, out_dir):
    engine, wsm = engine_for(stage)
    assert wds.attach(engine) is wsm and unwrap(engine.optimizer) is wsm and unwrap(engine) is wsm
    names = [n for n, _ in engine.module.named_parameters()]
    snapshots = [masters(engine)]
    worst = 0.0
    for s, batch in enumerate(batches(STEPS), start=1):
        train(engine, [batch])
        snapshots.append(masters(engine))
        merged = wds.merged_state_dict(engine, torch.float32)
        expected = reference.readout(SPEC, snapshots, s)
        for name, ref in zip(names, expected):
            worst = max(worst, float((merged[name].to(torch.float64) - ref).abs().max()))
    live = {k: v.clone() for k, v in engine.module.state_dict().items()}
    merged = wds.merged_state_dict(engine)
    with wds.merged_weights(engine):
        inside = {k: v.clone() for k, v in engine.module.state_dict().items()}
        inside_masters = [m.to(torch.float32) for m in masters(engine)]
    restored = all(torch.equal(v, live[k]) for k, v in engine.module.state_dict().items())
    with unwrap(engine).merged_weights():  # the optimizer's own swap: the module's copies hold the merge too
        through_unwrap = {k: v.clone() for k, v in engine.module.state_dict().items()}
    full = wds.merged_state_dict(engine, model=engine.module)
    of_a_copy = wds.merged_state_dict(engine, model=copy.deepcopy(engine.module))
    return {
        "copy_of_the_module_gives_the_merge": sorted(of_a_copy) == sorted(full) and all(
            torch.equal(of_a_copy[k], full[k]) for k in full) and all(torch.equal(of_a_copy[k], merged[k]) for k in merged),
        "unwrap_swap_equals_readout": all(torch.equal(through_unwrap[k], merged[k]) for k in merged),
        "steps": wsm.steps,
        "worst_vs_explicit_merge": worst,
        "swap_equals_readout": all(torch.equal(inside[k], merged[k]) for k in merged),
        "swap_masters_equal_readout": all(torch.equal(m, merged[n]) for n, m in zip(names, inside_masters)),
        "restored_bit_exactly": restored,
        "masters_restored": all(torch.equal(a.to(torch.float64), b) for a, b in zip(masters(engine), snapshots[-1])),
        "model_keys": sorted(full) == sorted(engine.module.state_dict()),
    }


def resumed(ckpt, stage, batches, **options):
    """A fresh engine (another init: everything comes from the checkpoint) loaded from ``ckpt``'s tag ``s5``,
    then trained on ``batches``; returns ``(engine, wsm, steps counted right after the load)``."""
    engine, wsm = engine_for(stage, seed=3, **options)
    wds.attach(engine)
    engine.load_checkpoint(ckpt, tag="s5")
    steps = wsm.steps
    train(engine, batches)
    return engine, wsm, steps


def case_resume_through_deepspeed_checkpoint_is_exact(stage, out_dir):
    ckpt = os.path.join(out_dir, f"ckpt{stage}")
    data = batches(STEPS)
    a, wa = engine_for(stage)
    wds.attach(a)
    train(a, data[:5])  # mid-window (window 4, interval 2: step 5 is between checkpoints)
    a.save_checkpoint(ckpt, tag="s5")
    train(a, data[5:])
    b, wb, resumed_steps = resumed(ckpt, stage, data[5:])
    ma, mb = wds.merged_state_dict(a, torch.float32), wds.merged_state_dict(b, torch.float32)
    return {
        "resumed_steps": resumed_steps,
        "steps": [wa.steps, wb.steps],
        "merged_equal": all(torch.equal(ma[k], mb[k]) for k in ma),
        "status_equal": wa.merge_status()["checkpoint"] == wb.merge_status()["checkpoint"],
    }


def case_bf16_copies_follow_the_merged_masters(stage, out_dir):
    """bf16 module params, fp32 masters: the merge is of the masters; the swap casts it into the copies."""
    engine, wsm = engine_for(stage, bf16=True)
    wds.attach(engine)
    names = [n for n, _ in engine.module.named_parameters()]
    snapshots = [masters(engine)]
    for batch in batches(STEPS):
        train(engine, [batch])
        snapshots.append(masters(engine))
    merged32 = wds.merged_state_dict(engine, torch.float32)
    expected = reference.readout(SPEC, snapshots, STEPS)
    worst = max(float((merged32[n].to(torch.float64) - e).abs().max()) for n, e in zip(names, expected))
    merged = wds.merged_state_dict(engine)
    live = {k: v.clone() for k, v in engine.module.state_dict().items()}
    with wds.merged_weights(engine):
        inside = {k: v.clone() for k, v in engine.module.state_dict().items()}
    return {
        "dtype": str(merged[names[0]].dtype),
        "worst_vs_explicit_merge": worst,
        "copies_are_the_cast_merge": all(torch.equal(inside[n], merged32[n].to(torch.bfloat16)) for n in names),
        "restored_bit_exactly": all(torch.equal(v, live[k]) for k, v in engine.module.state_dict().items()),
    }


def case_round_robin_gradients(stage, out_dir):
    """round_robin_gradients reorders the params in the flat groups: the readout follows DeepSpeed's layout.

    fp32, so the module's params are the masters' values; the reference snapshots them (under round robin
    DeepSpeed 0.19's safe_get_full_fp32_param returns other params' values, which the test records).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1))
    wsm = WSMOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), **SPEC.as_kwargs())
    config = {"train_micro_batch_size_per_gpu": 4, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": stage, "round_robin_gradients": True}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=wsm, config=config)
    wds.attach(engine)
    names = [n for n, _ in engine.module.named_parameters()]
    snapshots = [[p.detach().to(torch.float64, copy=True) for p in engine.module.parameters()]]
    worst = 0.0
    g = torch.Generator().manual_seed(100 + RANK)
    for s in range(1, STEPS + 1):
        engine.backward(engine(torch.randn(4, 9, generator=g)).square().mean())
        engine.step()
        snapshots.append([p.detach().to(torch.float64, copy=True) for p in engine.module.parameters()])
        merged = wds.merged_state_dict(engine, torch.float32)
        for name, ref in zip(names, reference.readout(SPEC, snapshots, s)):
            worst = max(worst, float((merged[name].to(torch.float64) - ref).abs().max()))
    accessor = max(float((a - b).abs().max()) for a, b in zip(masters(engine), snapshots[-1]))
    return {"steps": wsm.steps, "worst_vs_explicit_merge": worst, "deepspeed_accessor_off_by": accessor}


def case_stage3_is_refused(stage, out_dir):
    engine, _ = engine_for(3)
    try:
        wds.attach(engine)
    except NotImplementedError as e:
        return {"refused": str(e)}
    return {"refused": None}


def refused_step(engine, wsm):
    """The first engine step's error (type: message), or None if it trained; and the merge steps counted."""
    try:
        train(engine, batches(1))
    except Exception as e:  # noqa: BLE001 - what a user would see
        return f"{type(e).__name__}: {e}", wsm.steps
    return None, wsm.steps


def case_universal_checkpoint_is_refused(stage, out_dir):
    """Loading a ZeRO checkpoint converted by DeepSpeed's ds_to_universal (which keeps no merge) is refused."""
    import subprocess

    ckpt = os.path.join(out_dir, "universal")
    engine, _ = engine_for(stage, one_group=True)
    wds.attach(engine)
    train(engine, batches(3))
    engine.save_checkpoint(ckpt, tag="s3", client_state={"universal_checkpoint_info": {}})  # what the converter needs
    if RANK == 0:
        subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", os.path.join(ckpt, "s3"),
             "--output_folder", os.path.join(ckpt, "s3_universal"), "--num_extract_workers", "1",
             "--num_merge_workers", "1"], check=True, capture_output=True,
        )
    torch.distributed.barrier()
    loaded, wsm = engine_for(stage, one_group=True, seed=3, checkpoint={"load_universal": True})
    try:
        wds.attach(loaded)  # the engine is configured to load universal checkpoints: refused here
        loaded.load_checkpoint(ckpt, tag="s3_universal")
    except NotImplementedError as e:
        return {"message": str(e), "steps": wsm.steps}
    return {"message": None, "steps": wsm.steps}


def case_stage0_bf16_wrapper_is_refused(stage, out_dir):
    """bf16 without ZeRO: DeepSpeed's master-weight wrapper steps the client optimizer in deepspeed.initialize."""
    try:
        engine_for(0, bf16=True, one_group=True)
    except NotImplementedError as e:
        return {"message": str(e)}
    return {"message": None}


def case_stepped_without_attach_is_refused(stage, out_dir):
    """One param group (nothing cut per group) and no attach: refused at the first step, not merged silently."""
    engine, wsm = engine_for(stage, one_group=True)
    message, steps = refused_step(engine, wsm)
    return {"message": message, "steps": steps}


def case_stage0_steps_the_optimizer_as_is(stage, out_dir):
    engine, wsm = engine_for(0)
    assert wds.attach(engine) is wsm
    train(engine, batches(5))
    merged = wds.merged_state_dict(engine)
    expected = wsm.merged_state_dict(model=engine.module)
    with wds.merged_weights(engine):
        inside = {k: v.clone() for k, v in engine.module.state_dict().items()}
    return {"steps": wsm.steps, "equal": all(torch.equal(merged[k], expected[k]) for k in expected),
            "swap_equal": all(torch.equal(inside[k], expected[k]) for k in expected)}


BUFFERS = ["1.running_mean", "1.running_var"]


def merged_buffers(engine):
    """The module's merged buffers now, float64 (each rank's own: DeepSpeed does not partition buffers)."""
    state = engine.module.state_dict()
    return [state[k].to(torch.float64, copy=True) for k in BUFFERS]


def case_merge_buffers(stage, out_dir):
    """merge_buffers=True: BatchNorm running stats merged beside the flat partitions; readouts, swap, resume.

    Every rank sees the same batches, so the buffers are the same on every rank
    (DeepSpeed restores the live module, buffers included, from rank 0's file).
    """
    ckpt = os.path.join(out_dir, f"ckpt_buffers{stage}")
    data = batches(STEPS, shared=True)
    engine, wsm = engine_for(stage, merge_buffers=True)
    wds.attach(engine)
    names = [n for n, _ in engine.module.named_parameters()]
    params, buffers = [masters(engine)], [merged_buffers(engine)]
    worst_params = worst_buffers = 0.0
    for s, batch in enumerate(data, start=1):
        train(engine, [batch])
        params.append(masters(engine))
        buffers.append(merged_buffers(engine))
        merged = wds.merged_state_dict(engine, torch.float32)
        for name, ref in zip(names, reference.readout(SPEC, params, s)):
            worst_params = max(worst_params, float((merged[name].to(torch.float64) - ref).abs().max()))
        for name, ref in zip(BUFFERS, reference.readout(SPEC, buffers, s)):
            worst_buffers = max(worst_buffers, float((merged[name].to(torch.float64) - ref).abs().max()))
        if s == 5:  # mid-window (between checkpoints)
            engine.save_checkpoint(ckpt, tag="s5")
    merged = wds.merged_state_dict(engine)
    full = wds.merged_state_dict(engine, model=engine.module)
    live = {k: v.clone() for k, v in engine.module.state_dict().items()}
    with wds.merged_weights(engine):
        inside = {k: v.clone() for k, v in engine.module.state_dict().items()}
    restored = all(torch.equal(v, live[k]) for k, v in engine.module.state_dict().items())
    b, wb, resumed_steps = resumed(ckpt, stage, data[5:], merge_buffers=True)
    ma, mb = wds.merged_state_dict(engine, torch.float32), wds.merged_state_dict(b, torch.float32)
    return {
        "steps": [wsm.steps, wb.steps],
        "resumed_steps": resumed_steps,
        "keys": sorted(merged) == sorted(names + BUFFERS),
        "full_keys": sorted(full) == sorted(live),
        "full_buffers_merged": all(torch.equal(full[k], merged[k]) for k in BUFFERS),
        "num_batches_tracked_live": torch.equal(full["1.num_batches_tracked"], live["1.num_batches_tracked"]),
        "buffers_differ_from_live": all(not torch.equal(merged[k], live[k]) for k in BUFFERS),
        "worst_params_vs_explicit_merge": worst_params,
        "worst_buffers_vs_explicit_merge": worst_buffers,
        "swap_equals_readout": all(torch.equal(inside[k], merged[k]) for k in merged),
        "restored_bit_exactly": restored,
        "saved_buffer_names": wsm.state_dict()["wsm"]["buffers"],
        "resumed_merged_equal": sorted(ma) == sorted(mb) and all(torch.equal(ma[k], mb[k]) for k in ma),
        "resumed_live_equal": all(torch.equal(v, b.module.state_dict()[k]) for k, v in engine.module.state_dict().items()),
    }


CASES = [case_merge_equals_explicit_merge, case_resume_through_deepspeed_checkpoint_is_exact, case_merge_buffers]


def main():
    deepspeed.init_distributed(dist_backend="gloo")
    cases = {f"{case.__name__[5:]}[{stage}]": functools.partial(case, stage) for stage in (1, 2) for case in CASES}
    cases["bf16_copies_follow_the_merged_masters"] = functools.partial(case_bf16_copies_follow_the_merged_masters, 2)
    cases["stage0_steps_the_optimizer_as_is"] = functools.partial(case_stage0_steps_the_optimizer_as_is, 0)
    cases["stage3_is_refused"] = functools.partial(case_stage3_is_refused, 3)
    cases["round_robin_gradients"] = functools.partial(case_round_robin_gradients, 2)
    cases["stage0_bf16_wrapper_is_refused"] = functools.partial(case_stage0_bf16_wrapper_is_refused, 0)
    cases["universal_checkpoint_is_refused"] = functools.partial(case_universal_checkpoint_is_refused, 2)
    for stage in (2, 3):  # ZeRO-3 without attach: refused at the first step too, naming the stage
        cases[f"stepped_without_attach_is_refused[{stage}]"] = functools.partial(
            case_stepped_without_attach_is_refused, stage
        )
    run_cases(cases)


if __name__ == "__main__":
    main()
