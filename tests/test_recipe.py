"""The recipe knobs: pixel loss, LR schedule, optimizer settings, GAN ramp, wall-clock budget."""

import json
import math

import pytest
import torch
from accelerate import Accelerator

from kl_ae.config import load_config

from kl_ae.parsing import ConfigError
from kl_ae.losses import disc_factor_at, reconstruction_loss
from kl_ae.schedule import LRFactor, build_scheduler, configure, set_progress, start_step


def test_pixel_loss_weighted_sum_of_l1_and_l2():
    x = torch.tensor([0.5, -0.5, 0.0, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    x_hat = torch.tensor([0.3, 0.5, 0.0, -1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    # |d| = 0.2, 1.0, 0, 2.0; d^2 = 0.04, 1.0, 0, 4.0
    rec = reconstruction_loss(x, x_hat, None, 0.0, l1_weight=0.5, l2_weight=2.0)
    expected = torch.tensor([0.5 * 0.2 + 2 * 0.04, 0.5 + 2.0, 0.0, 1.0 + 8.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    torch.testing.assert_close(rec, expected)
    l2_only = reconstruction_loss(x, x_hat, None, 0.0, l1_weight=0.0, l2_weight=1.0)
    torch.testing.assert_close(l2_only, (x - x_hat) ** 2)
    assert torch.equal(reconstruction_loss(x, x_hat), (x - x_hat).abs())  # default: LDM's L1, bit for bit


def test_disc_ramp_rises_linearly_after_disc_start():
    assert disc_factor_at(9, 10, ramp_steps=4) == 0.0
    assert [disc_factor_at(s, 10, ramp_steps=4) for s in (10, 11, 12, 13, 14, 100)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert disc_factor_at(11, 10, factor=0.5, ramp_steps=4) == 0.25
    assert disc_factor_at(10, 10, ramp_steps=0) == 1.0  # LDM: on at once


@pytest.mark.parametrize("schedule,expected", [
    # warmup 10 steps, decay over steps 10..110, final ratio 0.1
    ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 60: 1.0, 110: 1.0}),
    ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.55, 110: 0.1, 500: 0.1}),
    ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 35: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), 60: 0.55, 110: 0.1}),
])
def test_lr_factor_formulas(schedule, expected):
    f = LRFactor(schedule, warmup_steps=10, max_steps=110, final_ratio=0.1)
    for step, value in expected.items():
        assert f(step) == pytest.approx(value), (schedule, step)


def test_lr_decays_over_the_time_budget_when_it_comes_first():
    f = LRFactor("cosine", warmup_steps=0, max_steps=10**6)
    assert f(100) == pytest.approx(1.0, abs=1e-6)  # by steps: almost nothing done
    f.time_fraction = 0.5
    assert f(100) == pytest.approx(0.5)
    f.time_fraction = 1.5  # past the budget: clamped at the final LR
    assert f(100) == pytest.approx(0.0)


def test_scheduler_drives_the_optimizer_and_resumes_its_time_fraction():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = build_scheduler(opt, "linear", warmup_steps=0, max_steps=10**6)
    set_progress(sched, time_fraction=0.25)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * 0.75, rel=1e-5)
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched2 = build_scheduler(opt2, "linear", warmup_steps=0, max_steps=10**6)
    sched2.load_state_dict(state)
    assert sched2.lr_lambdas[0].time_fraction == 0.25
    configure(sched2, "cosine", 0, 500)  # a resume under another schedule keeps only the progress
    f = sched2.lr_lambdas[0]
    assert (f.schedule, f.max_steps, f.time_fraction) == ("cosine", 500, 0.25)


def test_global_step_drives_a_scheduler_that_stepped_less_often():
    """The discriminator's scheduler steps only after disc_start; its decay follows the run's step."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, "linear", warmup_steps=0, max_steps=100)
    set_progress(sched, global_step=75)
    opt.step()
    sched.step()  # its own count says 1, the run is at step 75
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)


def test_start_step_gives_a_scheduler_that_never_stepped_the_runs_lr():
    """The discriminator's scheduler has not stepped before disc_start; its first update must not
    use the factor of step 0 (0 during warm-up)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, "linear", warmup_steps=10, max_steps=110)
    assert opt.param_groups[0]["lr"] == 0.0  # LambdaLR's start: the warm-up factor of step 0
    start_step(sched, 60)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # half of the decay after the warm-up
    start_step(sched, 5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # warm-up: 5 / 10


def test_discriminator_first_update_uses_the_runs_learning_rate(tmp_path, monkeypatch):
    import helpers
    import kl_ae.step
    from kl_ae.trainer import train

    real_update = kl_ae.step._update
    lrs = {"ae": [], "disc": []}

    def spy(accelerator, loss, module, optimizer, scheduler, max_grad_norm):
        name = "disc" if "Discriminator" in type(accelerator.unwrap_model(module)).__name__ else "ae"
        lrs[name].append(optimizer.param_groups[0]["lr"])
        return real_update(accelerator, loss, module, optimizer, scheduler, max_grad_norm)

    monkeypatch.setattr(kl_ae.step, "_update", spy)
    photos = helpers.write_noise_photos(tmp_path / "photos", 4)
    cfg = load_config(None, helpers.tiny_train_overrides(
        photos, tmp_path / "run", 6, **{"loss.disc_start": 4, "optim.lr_warmup_steps": 2, "optim.scale_lr": "false",
                                        "optim.base_learning_rate": 1e-3}))
    train(cfg)
    assert lrs["ae"] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3])  # warm-up over 2 steps, then constant
    assert lrs["disc"] == pytest.approx([1e-3, 1e-3])  # steps 4 and 5 (0-based), the first one included


def test_optimizer_settings_reach_the_optimizers(tmp_path):
    from kl_ae.trainer import _build, _Frozen

    cfg = load_config(None, ["model.block_out_channels=[8,16]", "model.norm_num_groups=8", "loss.perceptual_weight=0",
                             "optim.betas=[0.9,0.99]", "optim.weight_decay=0.01", "optim.disc_betas=[0.0,0.99]",
                             "optim.scale_lr=false", "optim.base_learning_rate=1e-3", "optim.lr_schedule=cosine",
                             "optim.lr_warmup_steps=5"])
    _, _, opt_ae, opt_disc, sched_ae, _ = _build(cfg, Accelerator(cpu=True), _Frozen())
    group = opt_ae.param_groups[0]
    assert group["betas"] == (0.9, 0.99) and group["weight_decay"] == 0.01
    assert isinstance(opt_ae, torch.optim.AdamW)
    assert opt_disc.param_groups[0]["betas"] == (0.0, 0.99) and opt_disc.param_groups[0]["weight_decay"] == 0
    assert group["lr"] == 0.0  # warm-up starts at 0
    assert sched_ae.lr_lambdas[0].schedule == "cosine"


@pytest.mark.parametrize("override,key", [
    ("optim.lr_schedule=step", "optim.lr_schedule"), ("optim.betas=[0.9]", "optim.betas"),
    ("optim.lr_final_ratio=2", "optim.lr_final_ratio"), ("train.max_minutes=-1", "train.max_minutes"),
    ("loss.l1_weight=0", "loss.l1_weight"), ("loss.disc_ramp_steps=-3", "loss.disc_ramp_steps"),
    ("data.final_fraction=0.2", "data.final_resolution"),  # a fraction without a resolution
    ("data.final_resolution=512", "data.final_resolution"),  # ... and the other way round
    ("data.final_resolution=260 data.final_fraction=0.2", "data.final_resolution"),  # not a multiple of 8
    ("data.final_resolution=512 data.final_fraction=1.0", "data.final_fraction"),
    ("data.final_resolution=512 data.final_fraction=0.2 data.short_side_range=[256,512]",
     "data.final_short_side_range"),  # the first phase's range cannot give 512-px crops
])
def test_bad_recipe_values_are_config_errors(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, override.split(" "))


def test_max_minutes_ends_the_run_with_checkpoints_at_time_marks(tmp_path, monkeypatch):
    """A fake clock of 40 s per optimizer step: time marks every minute, a 4-minute budget."""
    from test_train import tiny_overrides
    from helpers import write_noise_photos

    from kl_ae import trainer

    steps = {"n": 0}

    class FakeClock(trainer.TrainingClock):
        def seconds(self):
            return self.before + 40.0 * steps["n"]

    def count(optimizer, *_):
        steps["n"] += any(p.ndim == 4 and p.shape[0] == 3 for g in optimizer.param_groups for p in g["params"])

    monkeypatch.setattr(trainer, "TrainingClock", FakeClock)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(count)
    photos = write_noise_photos(tmp_path / "photos", 4, size=(40, 40))
    run_dir = tmp_path / "run"
    try:
        cfg = load_config(None, [*tiny_overrides(photos, run_dir, steps=1000), "loss.disc_start=100000",
                                 "train.checkpoint_every=100000", "train.eval_every=0", "train.keep_last=0",
                                 "train.max_minutes=4", "train.checkpoint_every_minutes=1",
                                 "optim.lr_schedule=cosine", "train.ema_decay=0"])
        trainer.train(cfg)
    finally:
        handle.remove()
    # 40 s per step: marks at 60, 120, 180 s are passed at steps 2 (80 s), 3 (120 s), 5 (200 s);
    # the 240 s budget ends the run at step 6
    states = {d.name: json.loads((d / "loop_state.json").read_text())
              for d in sorted((run_dir / "checkpoints").glob("step-*"))}
    assert list(states) == ["step-0000002", "step-0000003", "step-0000005", "step-0000006"]
    assert [s["train_seconds"] for s in states.values()] == [80.0, 120.0, 200.0, 240.0]
    assert states["step-0000006"]["images_seen"] == 6 * 2
    assert (run_dir / "export" / "config.json").is_file() and (run_dir / "eval.json").is_file()
    log = (run_dir / "train.log").read_text()
    assert "train.max_minutes=4 reached at step 6" in log
    # the LR of step 6 was set after step 5 (200 of 240 s): cosine factor 0.5 * (1 + cos(pi * 5 / 6))
    last_lr = float(log.split("optim/lr=")[-1].split()[0])
    assert last_lr == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 5 / 6)), rel=1e-3)


@pytest.mark.parametrize("quant_conv", [True, False])
def test_posterior_logvar_init_sets_every_posterior_log_variance(quant_conv):
    from kl_ae.model import load_or_build_autoencoder

    cfg = load_config(None, ["model.block_out_channels=[8,16]", "model.norm_num_groups=8",
                             f"model.use_quant_conv={str(quant_conv).lower()}", "model.posterior_logvar_init=-8"])
    vae = load_or_build_autoencoder(cfg.model)
    posterior = vae.encode(torch.rand(2, 3, 16, 16) * 2 - 1).latent_dist
    torch.testing.assert_close(posterior.logvar, torch.full_like(posterior.logvar, -8.0))
    assert posterior.mean.std() > 0  # the mean half keeps its random init
    default = load_or_build_autoencoder(load_config(None, ["model.block_out_channels=[8,16]",
                                                           "model.norm_num_groups=8"]).model)
    assert default.encode(torch.rand(2, 3, 16, 16)).latent_dist.logvar.std() > 0  # PyTorch's init (LDM)


def test_channel_shuffle_permutes_each_image_by_its_own_order():
    from kl_ae.data.images import shuffle_channels

    torch.manual_seed(0)
    x = torch.arange(3, dtype=torch.float32).view(1, 3, 1, 1).expand(600, 3, 4, 4).contiguous()
    y = shuffle_channels(x)
    orders = {tuple(int(v) for v in img[:, 0, 0]) for img in y}
    assert orders == {(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)}
    assert torch.equal(y.sort(dim=1).values, x)  # a permutation: no value lost or repeated


def test_decode_cache_gives_the_same_crops_and_decodes_each_file_once(tmp_path, monkeypatch):
    from helpers import write_noise_photos

    from kl_ae.data import loaders as data

    photos = sorted(write_noise_photos(tmp_path / "p", 3, size=(48, 64)).glob("*.png"))
    calls = []
    real_decode = data.decode
    monkeypatch.setattr(data, "decode", lambda *a, **k: calls.append(a[0]) or real_decode(*a, **k))
    plain = data.ImageFolderDataset(photos, 32, short_side_range=[32, 48])
    cached = data.ImageFolderDataset(photos, 32, short_side_range=[32, 48], decode_cache_mb=1)
    for k in range(9):  # three epochs of three files
        assert torch.equal(plain[k]["pixel_values"], cached[k]["pixel_values"])
    assert len(calls) == 9 + 3  # uncached: every item; cached: each file once
    tiny = data.ImageFolderDataset(photos, 32, decode_cache_mb=0)
    tiny[0]
    assert tiny.cache_budget == 0 and not tiny._cache


def test_final_phase_keeps_the_pixels_per_batch_unless_told():
    from kl_ae.data.loaders import final_phase_data

    cfg = load_config(None, ["data.resolution=64", "data.short_side_range=[128,256]", "data.final_resolution=256",
                             "data.final_fraction=0.2", "data.final_short_side_range=[256,384]"]).data
    data, batch = final_phase_data(cfg, batch_size=16)
    assert (data.resolution, data.short_side_range, batch) == (256, [256, 384], 1)  # 16 x 64^2 = 1 x 256^2
    assert final_phase_data(cfg, batch_size=48)[1] == 3
    assert final_phase_data(cfg, batch_size=4)[1] == 1  # never below one image
    cfg.final_batch_size, cfg.final_short_side_range = 2, []
    data, batch = final_phase_data(cfg, batch_size=16)
    assert (data.short_side_range, batch) == ([128, 256], 2)
    assert cfg.resolution == 64  # the first phase's settings are untouched


def test_resolution_schedule_trains_the_last_fraction_on_final_crops(tmp_path, monkeypatch):
    """6 steps, the last half (by steps) on 32-px crops of batch 1 instead of 16-px crops of 2."""
    from test_train import tiny_overrides
    from helpers import write_noise_photos

    from kl_ae import trainer

    shapes = []  # the encoder's input at every training forward pass

    def build_and_hook(*args, **kwargs):
        vae = build(*args, **kwargs)
        vae.encoder.conv_in.register_forward_pre_hook(
            lambda module, inputs: shapes.append(tuple(inputs[0].shape)) if torch.is_grad_enabled() else None)
        return vae

    build = trainer.load_or_build_autoencoder
    monkeypatch.setattr(trainer, "load_or_build_autoencoder", build_and_hook)
    photos = write_noise_photos(tmp_path / "photos", 4, size=(40, 40))
    run_dir = tmp_path / "run"
    cfg = load_config(None, [*tiny_overrides(photos, run_dir, steps=6), "data.resolution=16",
                             "data.final_resolution=32", "data.final_fraction=0.5", "loss.disc_start=100000",
                             "loss.perceptual_weight=0", "train.eval_every=0", "train.checkpoint_every=3",
                             "train.keep_last=0", "train.image_every=100"])
    trainer.train(cfg)
    assert shapes == [(2, 3, 16, 16)] * 3 + [(1, 3, 32, 32)] * 3  # step 3 of 6 ends the first half
    states = [json.loads((run_dir / f"checkpoints/step-{n:07d}/loop_state.json").read_text()) for n in (3, 6)]
    assert [s["phase"] for s in states] == [0, 1]
    assert [s["images_seen"] for s in states] == [6, 9]
    assert "phase 1: 32-px crops, batch 1 per process" in (run_dir / "train.log").read_text()
