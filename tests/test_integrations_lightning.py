"""Lightning: ``WSMCallback`` with a real ``Trainer`` on a tiny in-memory model (CPU)."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning")
import lightning.pytorch as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from wsm_optim import WSMOptimizer, unwrap  # noqa: E402
from wsm_optim.integrations.lightning import WSMCallback  # noqa: E402

BATCHES_PER_EPOCH = 3


class TinyRegressor(L.LightningModule):
    """4 -> 8 -> 1 MLP, MSE; ``scheduler`` / ``wsm`` pick what ``configure_optimizers`` returns."""

    def __init__(self, lr: float = 0.05, scheduler: str | bool = False, wsm: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.val_losses: list[float] = []
        self.val_params: list[dict[str, torch.Tensor]] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx == 0:
            self.val_params.append({k: v.detach().clone() for k, v in self.state_dict().items()})
        loss = nn.functional.mse_loss(self(x), y)
        self.log("val_loss", loss, on_epoch=True, batch_size=len(x))
        return loss

    def on_validation_epoch_end(self):
        self.val_losses.append(float(self.trainer.callback_metrics["val_loss"]))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        if self.hparams.wsm:
            return WSMOptimizer(opt, schedule="1-sqrt", window=4, model=self)
        if self.hparams.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if self.hparams.scheduler == "decay":  # warmup over 2 steps, then linear decay
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / 2, max(0.0, 1 - s / 12)))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if self.hparams.scheduler:  # warmup over 4 steps, then constant
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


def _data(seed=0, n=4 * BATCHES_PER_EPOCH):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=4, shuffle=False)


def _trainer(tmp_path, callbacks, max_epochs=4, **kwargs):
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TinyRegressor(**kwargs)


def _loss(model, loader):
    with torch.no_grad():
        xs, ys = zip(*loader)
        return [float(nn.functional.mse_loss(model(x), y)) for x, y in zip(xs, ys)]


class Probe(Callback):
    """Placed before ``WSMCallback``: sees the live weights and the merged readout before each swap."""

    def __init__(self, wsm_callback):
        self.cb = wsm_callback
        self.before_val: list[tuple[dict, dict, int]] = []  # (live, merged, steps)
        self.at_train_end = None

    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        live = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        merged = self.cb.optimizer.merged_state_dict(model=pl_module)
        self.before_val.append((live, merged, self.cb.optimizer.steps))

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.after_val_still_swapped = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer, pl_module):
        self.at_train_end = (
            {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            self.cb.optimizer.merged_state_dict(model=pl_module),
        )


def _equal(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def test_validation_sees_merged_weights_and_live_weights_come_back(tmp_path):
    cb = WSMCallback(schedule="1-sqrt", window=4)
    probe = Probe(cb)
    model, loader = _model(), _data()
    trainer = _trainer(tmp_path, [probe, cb], max_epochs=3, enable_checkpointing=False)
    trainer.fit(model, loader, loader)
    assert isinstance(unwrap(trainer.optimizers[0]), WSMOptimizer) and unwrap(trainer.optimizers[0]) is cb.optimizer
    assert cb.optimizer.steps == 3 * BATCHES_PER_EPOCH
    val_params = model.val_params[-len(probe.before_val) :]  # after the sanity check
    assert len(probe.before_val) == 3
    for (live, merged, steps), seen, val_loss in zip(probe.before_val, val_params, model.val_losses[-3:]):
        assert _equal(seen, merged), "validation did not run on the merged weights"
        assert not _equal(merged, live)  # mid-window: the merge differs from the live model
        other = copy.deepcopy(model)
        other.load_state_dict(merged)
        expected = sum(_loss(other, loader)) / BATCHES_PER_EPOCH
        assert val_loss == pytest.approx(expected, rel=1e-6)
    # the live weights are back after each validation: training continued from them
    # (checked bitwise by the resume test); here: the swap is closed
    assert cb._swap is None


def test_merged_weights_left_in_module_after_fit_or_not(tmp_path):
    for merged_after_fit in (True, False):
        cb = WSMCallback(window=5, merged_after_fit=merged_after_fit)
        probe = Probe(cb)
        model = _model()
        _trainer(tmp_path, [probe, cb], max_epochs=2, enable_checkpointing=False, limit_val_batches=0).fit(
            model, _data()
        )
        live, merged = probe.at_train_end
        assert _equal(model.state_dict(), merged if merged_after_fit else live)
        assert not _equal(live, merged)


def _resume_callbacks(tmp_path, sub):
    cb = WSMCallback(schedule="1-sqrt", window=8, interval=2)
    probe = Probe(cb)
    ckpt = ModelCheckpoint(dirpath=tmp_path / sub, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    return cb, probe, ckpt


def test_checkpoint_holds_merged_weights_and_resume_is_bit_exact_mid_window(tmp_path):
    loader = _data()
    # uninterrupted: 4 epochs x 3 steps; window 8 = 4 checkpoints every 2 steps
    cb_a, probe_a, ckpt_a = _resume_callbacks(tmp_path, "a")
    model_a = _model(scheduler=True)
    trainer_a = _trainer(tmp_path, [probe_a, cb_a, ckpt_a])
    cb_a.merged_after_fit = False  # compare live weights at the end
    trainer_a.fit(model_a, loader, loader)

    # the epoch-0 checkpoint (step 3): mid-window (checkpoint 1 of 4) and mid-interval
    path = tmp_path / "a" / "epoch=0.ckpt"
    saved = torch.load(path, weights_only=False)
    live_0, merged_0, steps_0 = probe_a.before_val[0]
    assert steps_0 == 3
    assert _equal(saved["state_dict"], merged_0), "checkpoint['state_dict'] must hold the merged weights"
    assert _equal(saved["current_model_state"], live_0), "the live weights must be kept for resuming"
    status = saved["optimizer_states"][0]["wsm"]["merges"]["default"]["counters"]
    assert (status["t"], status["r"]) == (1, 1)

    # load_from_checkpoint gives the merged model
    loaded = TinyRegressor.load_from_checkpoint(path)
    assert _equal(loaded.state_dict(), merged_0)

    # resume from step 3 to step 12
    cb_b, probe_b, ckpt_b = _resume_callbacks(tmp_path, "b")
    cb_b.merged_after_fit = False
    model_b = _model(seed=123, scheduler=True)  # different init: everything must come from the checkpoint
    trainer_b = _trainer(tmp_path, [probe_b, cb_b, ckpt_b])
    trainer_b.fit(model_b, loader, loader, ckpt_path=path)

    wsm_a, wsm_b = cb_a.optimizer, cb_b.optimizer
    assert wsm_b.steps == wsm_a.steps == 4 * BATCHES_PER_EPOCH
    assert _equal(model_b.state_dict(), model_a.state_dict()), "live weights differ after resume"
    assert _equal(wsm_b.merged_state_dict(model=model_b), wsm_a.merged_state_dict(model=model_a))
    sa, sb = wsm_a.merge_status(), wsm_b.merge_status()
    assert (sa["window_index"], sa["checkpoint"], sa["steps_since_checkpoint"]) == (
        sb["window_index"], sb["checkpoint"], sb["steps_since_checkpoint"]
    )
    # validation scores after resume are those of the uninterrupted run, and the checkpoints match
    assert model_b.val_losses[-3:] == model_a.val_losses[-3:]
    for epoch in (1, 2, 3):
        a = torch.load(tmp_path / "a" / f"epoch={epoch}.ckpt", weights_only=False)
        b = torch.load(tmp_path / "b" / f"epoch={epoch}.ckpt", weights_only=False)
        assert _equal(a["state_dict"], b["state_dict"]) and _equal(a["current_model_state"], b["current_model_state"])
    assert trainer_b.lr_scheduler_configs[0].scheduler.last_epoch == trainer_a.lr_scheduler_configs[0].scheduler.last_epoch


def test_monitor_best_and_validate_best_score_the_merged_model(tmp_path):
    cb = WSMCallback(schedule="linear", window=5)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val_loss", mode="min", save_top_k=1)
    model, loader = _model(), _data()
    trainer = _trainer(tmp_path, [cb, ckpt])
    trainer.fit(model, loader, loader)
    best = torch.load(ckpt.best_model_path, weights_only=False)
    (result,) = trainer.validate(model, loader, ckpt_path="best", verbose=False)
    # validate(ckpt_path="best") scored exactly the weights ModelCheckpoint ranked as best
    assert result["val_loss"] == pytest.approx(float(ckpt.best_model_score), rel=1e-6)
    assert _equal(model.state_dict(), best["state_dict"])
    assert not _equal(best["state_dict"], best["current_model_state"])
    loaded = TinyRegressor.load_from_checkpoint(ckpt.best_model_path)
    assert sum(_loss(loaded, loader)) / BATCHES_PER_EPOCH == pytest.approx(float(ckpt.best_model_score), rel=1e-6)


def test_lr_scheduler_is_repointed_and_keeps_working(tmp_path):
    cb = WSMCallback(window=4)
    model = _model(scheduler=True)
    trainer = _trainer(tmp_path, [cb], max_epochs=1, enable_checkpointing=False, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _data())
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.optimizer is cb.optimizer
    assert sched.last_epoch == BATCHES_PER_EPOCH
    assert cb.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * min(1.0, (BATCHES_PER_EPOCH + 1) / 4))
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message) or "overridden" in str(w.message)]
    assert not [w for w in caught if "WSMCallback" in str(w.message)]


@pytest.mark.parametrize("scheduler", ["decay", "cosine"])
def test_decaying_scheduler_warns(tmp_path, scheduler):
    trainer = _trainer(tmp_path, [WSMCallback(window=4)], max_epochs=1, max_steps=12, enable_checkpointing=False,
                       limit_val_batches=0)
    with pytest.warns(UserWarning, match="decays the learning rate after warmup"):
        trainer.fit(_model(scheduler=scheduler), _data())


def test_weights_only_checkpoints_warn(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)
    trainer = _trainer(tmp_path, [WSMCallback(window=4), ckpt], max_epochs=1, limit_val_batches=0)
    with pytest.warns(UserWarning, match="LIVE weights"):
        trainer.fit(_model(), _data())


def test_several_merges_validate_and_save_the_named_one(tmp_path):
    cb = WSMCallback(
        merges={"short": dict(window=2), "long": dict(schedule="1-sqrt", window=6)}, merge="long",
        merged_after_fit=False,
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    model = _model()
    _trainer(tmp_path, [cb, ckpt], max_epochs=1).fit(model, _data(), _data())
    saved = torch.load(tmp_path / "ck" / "epoch=0.ckpt", weights_only=False)  # saved after the last step
    assert _equal(saved["state_dict"], cb.optimizer.merged_state_dict(model=model, merge="long"))
    assert not _equal(saved["state_dict"], cb.optimizer.merged_state_dict(model=model, merge="short"))
    assert _equal(model.val_params[-1], saved["state_dict"])
    assert _equal(model.state_dict(), saved["current_model_state"])


def test_wsm_optimizer_from_configure_optimizers_is_used_as_is(tmp_path):
    cb = WSMCallback()
    model = _model(wsm=True)
    _trainer(tmp_path, [cb], max_epochs=1, enable_checkpointing=False, limit_val_batches=0).fit(model, _data())
    assert cb.optimizer.steps == BATCHES_PER_EPOCH and cb.optimizer.merge_status()["k"] == 4


@pytest.mark.parametrize(
    "make, kwargs, error, match",
    [
        (lambda: WSMCallback(window=4), dict(wsm=True), TypeError, "already returns a WSMOptimizer"),
        (lambda: WSMCallback(), dict(), TypeError, "window is required"),
    ],
)
def test_clear_errors_when_fit_starts(tmp_path, make, kwargs, error, match):
    trainer = _trainer(tmp_path, [make()], max_epochs=1, enable_checkpointing=False, limit_val_batches=0)
    with pytest.raises(error, match=match):
        trainer.fit(_model(**kwargs), _data())


def test_clear_errors_at_construction():
    with pytest.raises(TypeError, match="window is required"):
        WSMCallback(schedule="cosine")
    with pytest.raises(ValueError, match="name the one to validate"):
        WSMCallback(merges={"a": dict(window=4), "b": dict(window=8)})
    with pytest.raises(TypeError, match="not both"):
        WSMCallback(window=4, merges={"a": dict(window=4)})


class ManualStepInsideSwap(TinyRegressor):
    """Manual optimization that (wrongly) steps while the merged weights are swapped in."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()  # Lightning's LightningOptimizer around the WSMOptimizer
        with opt.merged_weights():
            self.manual_backward(super().training_step(batch, batch_idx))
            opt.step()  # must be refused: the live params are swapped out


def test_step_inside_merged_weights_through_lightning_optimizer_is_refused(tmp_path):
    trainer = _trainer(tmp_path, [WSMCallback(window=4)], max_epochs=1, enable_checkpointing=False, limit_val_batches=0)
    with pytest.raises(RuntimeError, match="inside merged_weights"):
        trainer.fit(ManualStepInsideSwap(), _data())


# ------------------------------------------------------------ merge_buffers=True
class TinyBatchNormRegressor(TinyRegressor):
    """4 -> 8 -> BatchNorm -> 1: running stats (merged with merge_buffers=True) and num_batches_tracked (live)."""

    def __init__(self, lr: float = 0.05, scheduler: str | bool = False, wsm: bool = False):
        super().__init__(lr=lr, scheduler=scheduler, wsm=wsm)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, momentum=0.3), nn.Tanh(), nn.Linear(8, 1))


BN_MERGED = ["net.1.running_mean", "net.1.running_var"]


def _bn_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TinyBatchNormRegressor(**kwargs)


class Snapshots(Callback):
    """float64 snapshots of the merged buffers after every optimizer step (index 0: when training starts)."""

    def __init__(self):
        self.steps: list[list[torch.Tensor]] = []

    def _take(self, pl_module):
        state = pl_module.state_dict()
        self.steps.append([state[k].detach().to(torch.float64, copy=True) for k in BN_MERGED])

    def on_train_start(self, trainer, pl_module):
        self._take(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._take(pl_module)


def _eval_loss(model, state_dict, loader):
    other = copy.deepcopy(model)
    other.load_state_dict(state_dict)
    other.eval()  # BatchNorm on its running statistics, as in validation
    return sum(_loss(other, loader)) / BATCHES_PER_EPOCH


def test_merge_buffers_validation_scores_merged_params_and_buffers(tmp_path):
    from reference import Window, readout

    spec = Window("1-sqrt", window=4)
    cb = WSMCallback(merge_buffers=True, **spec.as_kwargs())
    probe, snaps = Probe(cb), Snapshots()
    model, loader = _bn_model(), _data()
    trainer = _trainer(tmp_path, [snaps, probe, cb], max_epochs=3, enable_checkpointing=False)
    trainer.fit(model, loader, loader)
    assert cb.optimizer.state_dict()["wsm"]["buffers"] == BN_MERGED
    val_params = model.val_params[-len(probe.before_val):]
    assert len(probe.before_val) == 3
    for (live, merged, steps), seen, val_loss in zip(probe.before_val, val_params, model.val_losses[-3:]):
        assert _equal(seen, merged), "validation did not run on the merged params and buffers"
        for key, expected in zip(BN_MERGED, readout(spec, snaps.steps, steps)):
            torch.testing.assert_close(merged[key].double(), expected, rtol=1e-6, atol=1e-7)
            assert not torch.equal(merged[key], live[key])  # mid-window: merged buffers differ from the live ones
        assert torch.equal(merged["net.1.num_batches_tracked"], live["net.1.num_batches_tracked"])  # live
        assert val_loss == pytest.approx(_eval_loss(model, merged, loader), rel=1e-6)
    live_at_end, merged_at_end = probe.at_train_end
    assert _equal(model.state_dict(), merged_at_end), "merged_after_fit: merged params and buffers in the module"
    assert not torch.equal(live_at_end["net.1.running_mean"], merged_at_end["net.1.running_mean"])


def _bn_resume_callbacks(tmp_path, sub, window, interval):
    cb = WSMCallback(schedule="1-sqrt", window=window, interval=interval, merge_buffers=True, merged_after_fit=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / sub, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    return cb, Probe(cb), ckpt


@pytest.mark.parametrize(
    "window, interval, epoch",
    [(8, 2, 0), (6, 3, 1)],  # step 3: checkpoint 1 of 4 and one step past it; step 6: a window's end (anchor next)
)
def test_merge_buffers_checkpoint_holds_merged_buffers_and_resume_is_exact(tmp_path, window, interval, epoch):
    loader = _data()
    cb_a, probe_a, ckpt_a = _bn_resume_callbacks(tmp_path, "a", window, interval)
    model_a = _bn_model(scheduler=True)
    _trainer(tmp_path, [probe_a, cb_a, ckpt_a]).fit(model_a, loader, loader)

    path = tmp_path / "a" / f"epoch={epoch}.ckpt"
    saved = torch.load(path, weights_only=False)
    live_0, merged_0, steps_0 = probe_a.before_val[epoch]
    assert steps_0 == (epoch + 1) * BATCHES_PER_EPOCH
    assert _equal(saved["state_dict"], merged_0) and _equal(saved["current_model_state"], live_0)
    for key in BN_MERGED:
        assert not torch.equal(saved["state_dict"][key], saved["current_model_state"][key])
    assert torch.equal(saved["state_dict"]["net.1.num_batches_tracked"], torch.tensor(steps_0))  # live, not merged
    state = saved["optimizer_states"][0]
    assert state["wsm"]["buffers"] == BN_MERGED
    assert {f"wsm_acc.default:{k}" for k in BN_MERGED} <= set(state["state"][0])
    assert _equal(TinyBatchNormRegressor.load_from_checkpoint(path).state_dict(), merged_0)

    cb_b, probe_b, ckpt_b = _bn_resume_callbacks(tmp_path, "b", window, interval)
    model_b = _bn_model(seed=123, scheduler=True)  # other init: everything comes from the checkpoint
    _trainer(tmp_path, [probe_b, cb_b, ckpt_b]).fit(model_b, loader, loader, ckpt_path=path)
    assert cb_b.optimizer.steps == cb_a.optimizer.steps == 4 * BATCHES_PER_EPOCH
    assert _equal(model_b.state_dict(), model_a.state_dict()), "live params or buffers differ after resume"
    assert _equal(cb_b.optimizer.merged_state_dict(model=model_b), cb_a.optimizer.merged_state_dict(model=model_a))
    # every later readout (what validation ran on, its scores, the checkpoints) is the uninterrupted run's
    later = probe_a.before_val[epoch + 1:]
    assert len(later) == len(probe_b.before_val) == 3 - epoch
    for (live_a, merged_a, _), (live_b, merged_b, _) in zip(later, probe_b.before_val):
        assert _equal(merged_a, merged_b) and _equal(live_a, live_b)
    assert model_b.val_losses[-len(later):] == model_a.val_losses[-len(later):]
    for e in range(epoch + 1, 4):
        a = torch.load(tmp_path / "a" / f"epoch={e}.ckpt", weights_only=False)
        b = torch.load(tmp_path / "b" / f"epoch={e}.ckpt", weights_only=False)
        assert _equal(a["state_dict"], b["state_dict"]) and _equal(a["current_model_state"], b["current_model_state"])


def test_merge_buffers_needs_merge_arguments():
    with pytest.raises(ValueError, match="merge_buffers=True needs the merge arguments"):
        WSMCallback(merge_buffers=True)
