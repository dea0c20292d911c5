"""Optuna trials trained in packs (``[training] pack = K``, ``--pack K``).

A worker that packs runs K copies of its usual trial loop in K threads (``run_loops``): each
claims, heartbeats and records its own trial exactly as an unpacked worker does. Their
objectives do not train alone: they hand their configurations to one ``PackCoordinator``, which
trains them together as one ensemble (``bound_tuner.training.pack``) and gives each thread its model; each
thread then computes its own bound. Checkpoints report to each member's trial, so pruners work,
and a pruned member leaves the pack while the others train on.

A pack starts when K configurations wait, or when every thread that is inside a trial waits and
none has joined for ``grace`` seconds (the last trials of a study, or a sampler that holds some
threads back).

Two ways a pack ends early, kept apart:

* An error while a pack trains (CUDA out of memory, a bug in one configuration) fails the
  trials of that pack, each with the error as its reason (``PackFailed``); the coordinator
  goes on with the next pack and the worker with its next trials.
* The worker stopping (Ctrl-C or SIGTERM in the main thread, or one of its loops ending with an
  error) calls ``abort``: the running pack and every waiting thread end with
  ``PackInterrupted`` (an Exception, not a KeyboardInterrupt), and each of their trials ends as
  interrupted and is retried when the study resumes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from bound_tuner.evaluation.experiment import pack_terms
from bound_tuner.objectives.pack_stop import PACK_STOPPED, PackInterrupted
from bound_tuner.training.config import DiffusionConfig
from bound_tuner.training.pack import PackMember, PackStopped, train_packed

__all__ = ["PackCoordinator", "PackFailed", "PackInterrupted", "ThreadLock", "run_loops"]

DEFAULT_GRACE_S = 0.5


class PackFailed(RuntimeError):
    """The pack this trial trained in raised; its message is that error's, in one line."""


@dataclass
class _Slot:
    cfg: DiffusionConfig
    callback: Callable[[int, Any], None] | None
    result: PackMember | None = None
    error: BaseException | None = None  # the whole pack failed (PackFailed for every member)


class PackCoordinator:
    """Collects the configurations of concurrent trials and trains them as packs of ``size``."""

    def __init__(
        self,
        train: torch.Tensor,
        *,
        size: int,
        device: str | torch.device,
        grace: float = DEFAULT_GRACE_S,
    ) -> None:
        if size < 1:
            raise ValueError(f"pack size {size} must be at least 1")
        self.train_data, self.size, self.device, self.grace = train, size, device, grace
        self._cond = threading.Condition()
        self._in_trial = 0
        self._waiting: list[_Slot] = []
        self._training = False
        self._changed = time.monotonic()
        self.stop = threading.Event()

    @contextlib.contextmanager
    def trial(self) -> Iterator[None]:
        """Marks the calling thread as inside a trial (it may still hand in a configuration)."""
        with self._cond:
            self._in_trial += 1
            self._changed = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self._in_trial -= 1
                self._cond.notify_all()

    def abort(self) -> None:
        """Stop the running pack and every waiting thread for good (the worker is stopping):
        they raise PackInterrupted, and their trials end as interrupted."""
        self.stop.set()
        with self._cond:
            self._cond.notify_all()

    def _ready(self) -> bool:
        n = len(self._waiting)
        if self._training or n == 0:
            return False
        if n >= self.size:
            return True
        return n >= self._in_trial and time.monotonic() - self._changed >= self.grace

    def train(
        self, cfg: DiffusionConfig, callback: Callable[[int, Any], None] | None, every: int
    ) -> PackMember:
        """Train cfg's model in the next pack; blocks until it is trained (or ended)."""
        slot = _Slot(cfg, callback)
        with self._cond:
            self._waiting.append(slot)
            self._changed = time.monotonic()
            self._cond.notify_all()
            try:
                while True:
                    if self.stop.is_set():
                        raise PackInterrupted(PACK_STOPPED)
                    if slot.error is not None:
                        raise PackFailed(_first_line(slot.error)) from slot.error
                    if slot.result is not None:
                        return slot.result
                    if self._ready():
                        batch = self._waiting[: self.size]
                        del self._waiting[: self.size]
                        self._training = True
                        break
                    self._cond.wait(timeout=0.05)
            except BaseException:  # not trained: leave the queue (Ctrl-C in a wait included)
                if slot in self._waiting:
                    self._waiting.remove(slot)
                raise
        try:  # this thread trains the pack; the others wait for their results
            members = train_packed(
                self.train_data,
                [s.cfg for s in batch],
                device=self.device,
                callback=lambda j, step, model: _call(batch[j].callback, step, model),
                callback_every=every if any(s.callback for s in batch) else 0,
                stop=self.stop,
            )
            alive = [(mem, s.cfg) for mem, s in zip(members, batch, strict=True) if not mem.error]
            terms = pack_terms([a[0].model for a in alive], [a[1] for a in alive], self.train_data)
            for (mem, _), t in zip(alive, terms or [], strict=False):
                mem.terms = t
        except PackStopped:  # training's stop: ``abort`` set it
            self._end(batch, PackInterrupted(PACK_STOPPED))
            raise PackInterrupted(PACK_STOPPED) from None
        except Exception as e:  # this pack failed: its trials fail, the next pack trains
            self._end(batch, e)
            raise PackFailed(_first_line(e)) from e
        except BaseException:  # Ctrl-C in the thread that trains: the worker stops
            self.abort()
            raise
        finally:
            with self._cond:
                self._training = False
                self._cond.notify_all()
        with self._cond:
            for s, member in zip(batch, members, strict=True):
                s.result = member
            self._cond.notify_all()
        return slot.result

    def _end(self, batch: list[_Slot], error: BaseException) -> None:
        """The members of ``batch`` get ``error`` instead of a model."""
        with self._cond:
            for s in batch:
                s.error = error
            self._cond.notify_all()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _call(callback, step: int, model) -> None:
    if callback is not None:
        callback(step, model)


class ThreadLock:
    """A study lock (``bound_tuner.execution.lock.StudyLock``) also held against the other threads of this
    process, so that packed threads claim their trials one at a time."""

    def __init__(self, inner: Callable[[], Any]) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self.exclusive = bool(getattr(inner, "exclusive", False))

    @contextlib.contextmanager
    def __call__(self, **kw: Any) -> Iterator[None]:
        with self._lock, self._inner(**kw):
            yield


def run_loops(k: int, loop: Callable[[int], None], *, abort: Callable[[], None]) -> None:
    """Run loop(0) in this thread and loop(1..k-1) in k-1 threads; wait for all of them.

    An exception in any loop (KeyboardInterrupt in this one included) calls ``abort`` so that the
    others end too (their trials end as interrupted); once every thread has ended, the first
    exception that is not an interrupt is raised here, else the interrupt."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            loop(i)
        except BaseException as e:  # recorded and re-raised in the calling thread
            errors.append(e)
            abort()

    threads = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(1, k)]
    for t in threads:
        t.start()
    try:
        loop(0)
    except BaseException as e:
        errors.append(e)
        abort()
    finally:
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.2)
    if errors:
        causes = [e for e in errors if not isinstance(e, (KeyboardInterrupt, PackInterrupted))]
        raise causes[0] if causes else errors[0]
