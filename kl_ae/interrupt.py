"""Stopping a training cleanly on SIGINT (Ctrl-C) and SIGTERM (what SLURM, Kubernetes and
``accelerate launch`` send before they kill a job).

The first signal only sets a flag: the loop finishes its step, every rank agrees to stop after
the same step (:meth:`StopSignals.agreed`), a checkpoint is written and the run ends with
:class:`TrainingInterrupted`, whose exit code is the shell's convention 128 + signal number
(130 for SIGINT, 143 for SIGTERM). A second signal stops at once: SIGINT raises
KeyboardInterrupt, SIGTERM gets its default action (the process ends); the last complete
checkpoint stays valid either way, since checkpoints are written atomically. A repeat within
:data:`REPEAT_WINDOW_S` of the first is the same event delivered twice, not a second request:
Ctrl-C reaches every process of the terminal's group, and ``accelerate launch`` (torch
elastic) forwards the signal it got to its workers too. The launcher then waits 30 s for them
before it kills them (torch elastic's shutdown_timeout), the time a step and a checkpoint have.

Python's ``signal`` module is used directly: Accelerate and torch offer no handler of their own
(``Accelerator.set_trigger``/``check_trigger`` agree on a flag but cannot say which signal).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_WINDOW_S = 1.0  # a repeat sooner than this is the first signal forwarded, not a second one


class TrainingInterrupted(RuntimeError):
    """The run stopped on a signal after writing a checkpoint; ``exit_code`` is 128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


WORKER_GRACE_S = 60  # a data worker that got SIGTERM exits after this long at the latest


def ignore_in_worker(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a data worker ignores SIGINT and outlives a SIGTERM by up to
    WORKER_GRACE_S seconds, so a Ctrl-C sent to the whole process group (or SLURM's SIGTERM to
    every process) leaves it serving the batch the main process finishes its step with; the main
    process shuts it down when the run ends (kl_ae.data.loaders.TrainBatches.close). The grace
    ends in a normal exit (code 0): a worker killed by a signal would make torch raise in the
    main process mid-step, and one that never ended would stall multiprocessing's exit, which
    terminates daemonic children with SIGTERM and joins them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, lambda *_: os._exit(0))
    signal.signal(signal.SIGTERM, lambda *_: signal.alarm(WORKER_GRACE_S))


class StopSignals:
    """While active (a context manager), SIGINT and SIGTERM request a stop instead of killing.

    ``received``: the first signal's number, or None. Handlers are installed only in the main
    thread (Python allows nothing else) and the previous ones are restored on exit.
    announce: write one line to stderr when the first signal arrives (the main process).
    """

    def __init__(self, announce: bool = True):
        self.received: int | None = None
        self._received_at = 0.0
        self._announce = announce
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            if time.monotonic() - self._received_at < REPEAT_WINDOW_S:  # the first one, forwarded
                return
            # the second signal: stop at once
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.received, self._received_at = signum, time.monotonic()
        if self._announce:  # os.write: async-signal-safe, unlike logging or print
            os.write(2, f"\nkl-ae: {signal_name(signum)} received: finishing this step, then a checkpoint "
                        f"(send it again to stop at once)\n".encode())

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def agreed(self, accelerator) -> int | None:
        """The signal every rank stops on after this step, or None to go on. Under several
        processes a collective (every rank calls it after every optimizer step): one rank's
        signal stops them all at the same step, whichever rank got it."""
        if accelerator.num_processes == 1:
            return self.received
        mine = torch.tensor([self.received or 0], device=accelerator.device)
        signum = int(accelerator.gather(mine).max().item())
        return signum or None
