"""SIGINT / SIGTERM: finish the step, write a checkpoint, exit 130 / 143; resuming gives the
weights of an uninterrupted run. A second signal stops at once."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from kl_ae import interrupt
from kl_ae.checkpoint import read_loop_state, resolve_checkpoint
import helpers

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
STEPS = 30


def train_command(photos, run_dir, *extra):
    overrides = helpers.tiny_train_overrides(photos, run_dir, STEPS, **{
        "train.checkpoint_every": 7, "data.num_workers": 1, "train.ema_decay": 0.9,
        "loss.disc_start": 3, "loss.disc_channels": 8, "loss.disc_num_layers": 2})
    cmd = [sys.executable, "-m", "kl_ae.cli", "train", *extra]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def wait_for_step(run_dir, proc, step, timeout=120):
    """Until train.log shows a logged step >= ``step`` (train.log_every=1)."""
    deadline = time.monotonic() + timeout
    log = run_dir / "train.log"
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and f"step {step} " in log.read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} in {log} (exit code {proc.poll()})")


def final_weights(run_dir):
    ckpt = resolve_checkpoint("latest", run_dir)
    return read_loop_state(ckpt)["step"], load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "ema.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run's final weights, and its photos."""
    root = tmp_path_factory.mktemp("signals")
    photos = helpers.write_noise_photos(root / "photos", 4)
    done = subprocess.run(train_command(photos, root / "run"), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return photos, final_weights(root / "run")


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_checkpoints_and_exits_and_resume_reaches_the_same_weights(reference, tmp_path, signum, code):
    photos, (steps, model, ema) = reference
    run_dir = tmp_path / "run"
    # its own session: the signal goes to the whole process group, data worker included, as
    # Ctrl-C in a terminal (or SLURM's SIGTERM to every process) would
    proc = subprocess.Popen(train_command(photos, run_dir), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_step(run_dir, proc, 3)
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    stopped = read_loop_state(resolve_checkpoint("latest", run_dir))["step"]
    assert 3 <= stopped < STEPS
    assert "received: finishing this step" in err
    assert f"stopped by {signal.Signals(signum).name} after step {stopped} with a checkpoint" in err
    assert f"resume with: kl-ae train {run_dir / 'config.yaml'} --resume latest" in err
    assert "Traceback" not in err and not (run_dir / "export").exists()

    resumed = subprocess.run(train_command(photos, run_dir, "--resume", "latest"), env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got_steps, got_model, got_ema = final_weights(run_dir)
    assert got_steps == steps == STEPS
    for name in model:
        torch.testing.assert_close(got_model[name], model[name], rtol=0, atol=0, msg=name)
    for name in ema:
        torch.testing.assert_close(got_ema[name], ema[name], rtol=0, atol=0, msg=name)


def test_a_second_sigint_stops_at_once_and_a_forwarded_copy_does_not(monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    with interrupt.StopSignals(announce=False) as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)  # within REPEAT_WINDOW_S: the same Ctrl-C, forwarded
        monkeypatch.setattr(interrupt, "REPEAT_WINDOW_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here at the latest
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_a_second_sigterm_ends_the_process():
    script = ("import os, signal, time\n"
              "from kl_ae import interrupt\n"
              "interrupt.REPEAT_WINDOW_S = 0.0\n"
              "with interrupt.StopSignals(announce=False) as s:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    assert s.received == signal.SIGTERM\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(5)\n"
              "print('survived')\n")
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM and "survived" not in done.stdout, done.stderr


def launch_command(photos, run_dir, *extra):
    """``accelerate launch`` of 2 CPU processes (gloo) training the tiny model for STEPS steps."""
    overrides = helpers.tiny_train_overrides(photos, run_dir, STEPS, **{
        "train.checkpoint_every": 7, "loss.disc_start": 3, "loss.disc_channels": 8, "loss.disc_num_layers": 2})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kl_ae.cli", "train",
           *extra]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


@pytest.mark.slow
def test_sigterm_to_accelerate_launch_stops_both_ranks_at_one_step_and_resumes_exactly(tmp_path):
    """What Kubernetes or SLURM does: SIGTERM to the launcher, which forwards it to its workers."""
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    photos = helpers.write_noise_photos(tmp_path / "photos", 8)
    done = subprocess.run(launch_command(photos, tmp_path / "ref"), env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(launch_command(photos, run_dir), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir, proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torch elastic's launcher ends with its own error after forwarding
    ckpt = resolve_checkpoint("latest", run_dir)
    stopped = read_loop_state(ckpt)["step"]
    assert 3 <= stopped < STEPS
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()  # both ranks saved
    assert err.count(f"stopped by SIGTERM after step {stopped} with a checkpoint") == 1  # the main process says it
    log = (run_dir / "train.log").read_text()
    assert "parameters identical on all 2 ranks" in log and not (run_dir / "export").exists()

    resumed = subprocess.run(launch_command(photos, run_dir, "--resume", "latest"), env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "ref/checkpoints/step-0000030" / name))
        b = load_file(str(run_dir / "checkpoints/step-0000030" / name))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=f"{name}: {key}")


def test_a_signal_during_the_last_steps_bookkeeping_stops_before_the_export(tmp_path, monkeypatch):
    """The last step's sample grid, evaluation and checkpoint run after the step's signal check:
    a signal there stops the run with its checkpoint instead of going on to the export and the
    evaluation (which could outlast a scheduler's grace period); resuming then exports."""
    from kl_ae import trainer
    from kl_ae.config import load_config

    photos = helpers.write_noise_photos(tmp_path / "photos", 4)
    real_grid = trainer.save_sample_grid

    def grid_then_signal(accelerator, run_dir, x, rec, step):
        real_grid(accelerator, run_dir, x, rec, step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(trainer, "save_sample_grid", grid_then_signal)
    cfg = load_config(None, helpers.tiny_train_overrides(photos, tmp_path / "run", 3))
    with pytest.raises(interrupt.TrainingInterrupted):
        trainer.train(cfg)
    assert read_loop_state(resolve_checkpoint("latest", tmp_path / "run"))["step"] == 3
    assert not (tmp_path / "run" / "export").exists()
    monkeypatch.setattr(trainer, "save_sample_grid", real_grid)
    trainer.train(load_config(tmp_path / "run" / "config.yaml"), resume="latest")
    assert (tmp_path / "run" / "export" / "config.json").is_file()
