"""train.mixed_precision: 'auto' picks bf16 only where the device computes it natively."""

import logging
import math
import re

import pytest
import torch
from accelerate.state import AcceleratorState

import helpers
from kl_ae.config import load_config
from kl_ae.parsing import ConfigError
from kl_ae.precision import cpu_model, native_bf16, resolve_mixed_precision
import kl_ae.trainer as trainer_module
from kl_ae.trainer import train

CPU = torch.device("cpu")


def _cpu_caps(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (False, False, "no"), (True, False, "bf16"), (False, True, "bf16"), (True, True, "bf16"),
])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    _cpu_caps(monkeypatch, avx512_bf16, amx)
    resolved, note, level = resolve_mixed_precision("auto", CPU)
    assert resolved == expected and level == logging.INFO
    assert note.startswith(f"mixed precision: {expected} (train.mixed_precision=auto")


def test_cpu_without_the_capability_checks_is_not_native(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert native_bf16(CPU)[0] is False
    assert resolve_mixed_precision("auto", CPU)[0] == "no"


def test_explicit_bf16_is_kept_with_a_warning_where_emulated(monkeypatch):
    _cpu_caps(monkeypatch, False, False)
    resolved, note, level = resolve_mixed_precision("bf16", CPU)
    assert resolved == "bf16" and level == logging.WARNING and "much slower than fp32" in note
    _cpu_caps(monkeypatch, True, False)
    assert resolve_mixed_precision("bf16", CPU) == ("bf16", "mixed precision: bf16", logging.INFO)


@pytest.mark.parametrize("value", ["no", "fp16"])
def test_explicit_values_pass_through(monkeypatch, value):
    _cpu_caps(monkeypatch, True, True)
    assert resolve_mixed_precision(value, CPU)[0] == value


def test_other_devices_do_not_assume_bf16():
    assert resolve_mixed_precision("auto", torch.device("meta"))[0] == "no"


def test_bad_value_is_a_config_error_and_auto_is_the_default():
    assert load_config(None).train.mixed_precision == "auto"
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        load_config(None, ["train.mixed_precision=bf32"])
    with pytest.raises(ValueError, match="mixed precision"):
        resolve_mixed_precision("bf32", CPU)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide precision: start and leave this test with a clean one."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("native", [False, True])
def test_training_runs_in_the_resolved_precision(tmp_path, monkeypatch, fresh_accelerate_state, native):
    _cpu_caps(monkeypatch, native, False)
    photos = helpers.write_noise_photos(tmp_path / "photos", 4)
    seen = []
    real_autocast = torch.autocast

    def spy_autocast(device_type, dtype=None, enabled=True, **kw):
        seen.append((dtype, enabled))
        return real_autocast(device_type, dtype=dtype, enabled=enabled, **kw)

    monkeypatch.setattr(torch, "autocast", spy_autocast)
    cfg = load_config(None, [
        "model.block_out_channels=[8,16]", "model.layers_per_block=1", "model.norm_num_groups=8",
        f"data.train={photos}", "data.resolution=32", "data.num_workers=0", f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=1", "train.batch_size=2", "train.gradient_accumulation_steps=1",
        "train.scaling_images=2", "train.tracker=none", "loss.perceptual_weight=0",
        "train.mixed_precision=auto",
    ])
    train(cfg)
    log = (tmp_path / "run" / "train.log").read_text()
    expected = "bf16" if native else "no"
    assert f"mixed precision: {expected} (train.mixed_precision=auto on a CPU" in log
    bf16_regions = [s for s in seen if s == (torch.bfloat16, True)]
    assert bool(bf16_regions) == native


def test_cpu_model_names_the_first_processor_with_family_and_model(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    cpuinfo = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
               "model name\t: AMD EPYC\nflags\t\t: fpu avx512_bf16\n\n"
               "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: other\n")
    assert cpu_model(cpuinfo) == "AMD EPYC (family 26, model 2, AVX512)"
    monkeypatch.setattr("platform.processor", lambda: "arm")
    assert cpu_model("") == "arm (AVX512)"  # no /proc/cpuinfo fields: the platform's name


def _fp16_with_a_cpu_grad_scaler(monkeypatch, init_scale: float) -> list:
    """Accelerate gives fp16 a GradScaler on a GPU only: give the trainer's Accelerator the same
    one on this CPU (torch.amp.GradScaler('cpu')), with fp16 autocast. Returns the list that
    receives the scaler once it is built."""
    real_init = trainer_module.Accelerator.__init__
    scalers = []

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        assert self.mixed_precision == "fp16" and self.scaler is None  # what Accelerate does on a CPU
        self.native_amp = True
        self.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        scalers.append(self.scaler)

    monkeypatch.setattr(trainer_module.Accelerator, "__init__", init)
    return scalers


def test_fp16_overflows_back_off_the_loss_scale_without_stopping_the_run(tmp_path, monkeypatch,
                                                                        fresh_accelerate_state):
    """A GradScaler overflow skips that update and lowers the scale, as torch.amp intends: the run
    goes on (the next unscale does not raise), the overflows are counted apart from non-finite
    steps and do not trip train.max_nonfinite_steps, and the updates after the back-off train."""
    # GradScaler's default start, 2^16: the fp16 gradients of this loss (~1700, summed over pixels)
    # overflow at it, and the scaler halves the scale at each overflow
    scalers = _fp16_with_a_cpu_grad_scaler(monkeypatch, init_scale=2.0 ** 16)
    photos = helpers.write_noise_photos(tmp_path / "photos", 4)
    steps = 12
    cfg = load_config(None, helpers.tiny_train_overrides(
        photos, tmp_path / "run", steps, **{"train.mixed_precision": "fp16", "train.max_nonfinite_steps": 2,
                                            "loss.disc_start": 0, "train.ema_decay": 0}))
    train(cfg)
    log = (tmp_path / "run" / "train.log").read_text()
    overflows = log.count("fp16 gradient overflow")
    assert overflows >= 3  # more in a row than max_nonfinite_steps allows for non-finite steps
    assert overflows < steps  # and then the scaler found a scale at which the updates happen
    assert "non-finite loss or gradient" not in log
    assert scalers[0].get_scale() < 2.0 ** 16
    norms = re.findall(r"step \d+ .*optim/ae_grad_norm=(\S+)", log)
    assert len(norms) == steps and sum(math.isfinite(float(n)) for n in norms) == steps - overflows
    assert f"optim/fp16_overflow_steps={overflows}" in log


def test_fp16_with_accumulation_unscales_each_models_gradients_once(fresh_accelerate_state):
    """Under a GradScaler with 2 micro-batches, the autoencoder's update must not unscale the
    discriminator's gradients still pending from the first micro-batch (they would be divided by
    the scale twice). Two one-weight models: d(w·1)/dw = 1, averaged over the micro-batches."""
    from accelerate import Accelerator

    from kl_ae.step import _update

    acc = Accelerator(cpu=True, mixed_precision="fp16", gradient_accumulation_steps=2)
    acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu", init_scale=1024.0)  # as on a GPU
    a, b = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.0), torch.optim.SGD(b.parameters(), lr=0.0)
    s_a, s_b = (torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0) for o in (opt_a, opt_b))
    a, b, opt_a, opt_b, s_a, s_b = acc.prepare(a, b, opt_a, opt_b, s_a, s_b)
    seen = {}
    for name, model, opt in (("a", a, opt_a), ("b", b, opt_b)):
        opt.optimizer.register_step_pre_hook(
            lambda o, args, kwargs, name=name, model=model: seen.update({name: model.weight.grad.item()}))
    x = torch.ones(1, 1)
    for _ in range(2):
        with acc.accumulate(a, b):
            _update(acc, a(x).sum(), a, opt_a, s_a, 0.0)
            _update(acc, b(x).sum(), b, opt_b, s_b, 0.0)
    assert seen == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
