"""Params after wrapping: created lazily, moved, cast, re-laid-out, replaced, added, refused.

The accumulators follow their params (``README``: "They follow their params
afterwards"): buffers are created at the first ``step()`` where the params are
by then; a param that changes storage, dtype, layout or device mid-window keeps
its merge; one replaced by another object or added (``add_param_group``, or by
editing ``param_groups``) is adopted with its merge starting at its value; an
edit that is refused (shape change, meta or integer params) changes nothing.
Every merge is checked against the float64 reference (``tests/reference.py``).
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import harness as H
from wsm_optim import WSMOptimizer


# ---------------------- lazy buffers, where the params are at the first step
def test_buffers_are_created_at_the_first_step_where_the_params_are_then():
    model = H.tiny_model()
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), **H.TINY_SPEC)
    model.double()  # after wrapping, before training (as Trainer moves a model to its device)
    snaps = [H.model_snapshot(model)]
    for s in range(8):
        H.train_model(model, opt, 1, first=s)
        snaps.append(H.model_snapshot(model))
    state = opt.state_dict()["state"]
    assert all(state[i]["wsm_acc.default"].dtype == torch.float64 for i in range(4))
    names = [n for n, _ in model.named_parameters()]
    H.assert_matches(opt.merged_state_dict(), names, H.model_readout(snaps, 8), rtol=1e-12)


def test_meta_params_are_a_clear_error_not_a_copy_failure():
    with torch.device("meta"):
        model = nn.Linear(4, 3)
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=4)  # lazy: fine so far
    for call in (opt.step, opt.merged_state_dict, opt.state_dict):
        with pytest.raises(ValueError, match="is on the meta device. Build the inner optimizer and WSMOptimizer after"):
            call()


# -------- params changing storage, dtype, layout, shape or device mid-window
@pytest.mark.parametrize("backend", ["foreach", "triton"])
@pytest.mark.parametrize("change", ["storage", "dtype", "strides"])
def test_params_changing_storage_dtype_or_layout_mid_window(backend, change):
    model = H.tiny_model()
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.5), backend=backend, **H.TINY_SPEC)
    snaps = [H.model_snapshot(model)]
    for s in range(9):
        if s == 4:  # mid-window, between two checkpoints
            with torch.no_grad():
                for p in model.parameters():
                    if change == "storage":
                        p.data = p.data.clone()  # same values, new memory: stale pointers would corrupt
                    elif change == "dtype":
                        p.data = p.data.double()
                    elif p.ndim == 2:
                        p.data = p.data.t().contiguous().t()  # same values, transposed layout
            for buf in opt.state.values():
                buf["momentum_buffer"] = buf["momentum_buffer"].to(next(model.parameters()).dtype)
        H.train_model(model, opt, 1, first=s)
        snaps.append(H.model_snapshot(model))
    names = [n for n, _ in model.named_parameters()]
    H.assert_matches(opt.merged_state_dict(torch.float64), names, H.model_readout(snaps, 9))
    H.assert_matches(opt.merged_state_dict(torch.float64, completed=True), names, H.model_readout(snaps, 6))


def test_a_param_changing_shape_is_a_clear_error():
    model = H.tiny_model()
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=4)
    H.train_model(model, opt, 2)
    model[0].bias.data = torch.zeros(7)
    with pytest.raises(ValueError, match=r"changed shape from \(5,\) to \(7,\)"):
        opt.step()


@pytest.mark.cuda
def test_buffers_follow_a_model_moved_to_the_gpu_after_wrapping():
    model = H.tiny_model()
    opt = WSMOptimizer(torch.optim.AdamW(model.named_parameters(), lr=0.01), window=4)
    reference = copy.deepcopy(model).cuda()
    ref_opt = WSMOptimizer(torch.optim.AdamW(reference.named_parameters(), lr=0.01), window=4)
    model.cuda()  # Hugging Face order: optimizer built on the CPU model, then the Trainer moves the model
    for s in range(6):
        for m, o in ((model, opt), (reference, ref_opt)):
            H.model_grads(m, s)
            for p in m.parameters():
                p.grad = p.grad.cuda()
            o.step()
        if s == 2:  # and back and forth mid-window
            model.cpu()
            opt.step  # noqa: B018
            model.cuda()
    got, want = opt.merged_state_dict(), ref_opt.merged_state_dict()
    assert all(v.is_cuda for v in got.values()) and opt.backend == ref_opt.backend
    for k in want:
        torch.testing.assert_close(got[k], want[k])


# ----------------------------------------- params replaced by another object
@pytest.mark.parametrize("how", ["in-group", "setter"])
def test_a_param_replaced_by_another_object_is_adopted(how):
    model = H.tiny_model()
    opt = WSMOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), window=4)
    H.train_model(model, opt, 2)
    new = nn.Parameter(torch.randn(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "in-group":
            opt.param_groups[0]["params"][3] = new
        else:
            groups = [dict(g) for g in opt.param_groups]
            groups[0]["params"] = list(groups[0]["params"][:3]) + [new]
            opt.param_groups = groups
        merged = opt.merged_state_dict()
    assert any("replaced by new tensor objects" in str(w.message) for w in caught)
    assert torch.equal(merged["2.bias"], new.detach())  # its merge starts at its value
    H.model_grads(model, 2)
    new.grad = torch.ones(3)
    opt.step()
    assert "2.bias" in opt.merged_state_dict()
    assert len(opt.state_dict()["state"]) == 4


# ------------------------------------------------------ params added mid-run
def test_param_appended_to_param_groups_directly_is_merged():
    a = torch.nn.Parameter(torch.zeros(2))
    opt = WSMOptimizer(torch.optim.SGD(H.named_groups(a), lr=0.1), window=2)
    b = torch.nn.Parameter(torch.full((3,), 2.0))
    opt.param_groups[0]["params"].append(b)
    opt.param_groups[0]["param_names"].append("b")
    for p in (a, b):
        p.grad = torch.ones_like(p)
    opt.step()
    merged = opt.merged_state_dict(torch.float32)
    # linear, k = 2: after one step M = 1/3 * anchor + 2/3 * live
    torch.testing.assert_close(merged["b"], torch.full((3,), 2.0 - 2 / 3 * 0.1))


@pytest.mark.parametrize("backend", ["foreach", "triton"])
def test_param_added_after_a_skipped_checkpoint_reads_its_own_value(backend):
    a = torch.nn.Parameter(torch.ones(3))
    opt = WSMOptimizer(torch.optim.SGD(H.named_groups(a), lr=0.1), window=4, nonfinite="skip", backend=backend,
                       keep_last=True)
    for i in range(6):  # window 0 ends at step 4 with a skipped checkpoint; window 1 has one too
        a.grad = torch.ones(3)
        if i in (0, 4):
            with torch.no_grad():
                a[0] = float("nan")
        opt.step()
        if i in (0, 4):
            with torch.no_grad():
                a[0] = 1.0
    b = torch.nn.Parameter(torch.full((2,), 5.0))
    opt.add_param_group({"params": [b], "param_names": ["b"], "lr": 0.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skip warning itself is tested elsewhere
        assert opt.merged_state_dict(torch.float32)["b"].tolist() == [5.0, 5.0]
        assert opt.merged_state_dict(torch.float32, completed=True)["b"].tolist() == [5.0, 5.0]


# ---------------------------------------------- refused edits change nothing
def test_a_refused_add_param_group_leaves_the_inner_optimizer_as_it_was():
    p = torch.nn.Parameter(torch.ones(2))
    opt = WSMOptimizer(torch.optim.SGD([("p", p)], lr=0.1), window=2)
    with pytest.raises(TypeError, match="dtype torch.int64 cannot be merged"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.int64)]})
    assert len(opt.inner.param_groups) == 1
    p.grad = torch.ones(2)
    opt.step()
    assert opt.steps == 1


def test_a_refused_param_groups_edit_loses_nothing():
    p, q = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt = WSMOptimizer(torch.optim.SGD(H.named_groups(p, q), lr=0.1), window=4)
    for _ in range(2):
        p.grad, q.grad = torch.ones(1), torch.ones(1)
        opt.step()
    before = opt.merged_state_dict()
    group = opt.param_groups[0]
    keep = list(group["params"])
    group["params"][0] = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(TypeError, match="cannot be merged"):
        opt.merged_state_dict()
    group["params"][:] = keep
    after = opt.merged_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
