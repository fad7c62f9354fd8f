"""The one exception type that reaches the user as a single line, and CLIs built on it."""

import argparse
import contextlib
import errno
import gc
import os
import re
import signal
import sys
import threading
import typing
from pathlib import Path


class UserError(Exception):
    """Bad input or state the user can fix; the CLI prints it as one line and exits 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (with the usage) and exit status 2, as every error."""

    def __init__(self, *args, usage_line: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.usage_line = usage_line

    def error(self, message):
        """Refuse bad arguments as a UserError naming the usage."""
        raise UserError(f"{message} (usage: {self.usage_line})")


def one_line(err: Exception) -> str:
    """An error's message as one printable line; of torch.load's weights-only refusal, the cause.

    Messages about damaged files can quote their bytes, newlines and terminal escapes
    included. torch's refusal also advises weights_only=False, wrong for an untrusted file.
    """
    text = str(err)
    if text.startswith("Weights only load failed"):
        found = re.search(r"GLOBAL ([\w.]+)", text)
        return f"unsupported global {found.group(1)}" if found else "objects other than tensors"
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: stop where we are; what is written stays whole."""


_signals_received: list[int] = []
_deferring: list[bool] = []
_complete: list[bool] = []  # `results_complete` was called: only the teardown is left
RESUME_HINT = "interrupted: rerun the same command to resume"
COMPLETE_HINT = "interrupted as the run ended: its results are complete, nothing to resume"


def _interrupt(signum, frame):
    if _complete and _signals_received:  # a second one in the teardown: it may hang, stop
        _leave(signum)
    _signals_received.append(signum)
    if not _deferring and not _complete:
        raise Interrupted(signum)


def _leave(signum: int) -> typing.NoReturn:
    """End the process at once, after what it printed, with one line and 128 + signum."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    print(COMPLETE_HINT if _complete else RESUME_HINT, file=sys.stderr, flush=True)
    os._exit(128 + signum)


def results_complete() -> None:
    """Everything the process was to write is written whole: what is left is its teardown.

    From here a signal (SIGINT, SIGTERM, SIGHUP) changes nothing: the teardown finishes
    (trackers closed, the process group destroyed) and the process ends quietly with the
    status it has without the signal, 0, under `exit_on_user_error`. A second signal, as a
    teardown that hangs would need, ends it at once with one line and 128 + its number.
    """
    _complete.append(True)


def ignore_signals_once_complete() -> None:
    """A script's last step: after `results_complete`, ignore SIGINT, SIGTERM and SIGHUP for
    the rest of the interpreter's exit (a second or more with torch loaded).

    Python hands its signal handlers back to the default there, and a signal would kill
    the process without a line, its results complete.
    """
    if _complete:
        for signum in _handled_signals():
            signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def signals_deferred():
    """Only record a signal during the block; `raise_if_interrupted` raises it afterwards.

    An object a signal leaves half built (FFCV's epoch iterator) fails again in its own
    cleanup, after the resume line; a cleanup a second signal cuts short can leave a thread
    waiting.
    """
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()


def raise_if_interrupted() -> None:
    """Raise again a signal whose exception was swallowed (a numba callback ignores it)."""
    if _signals_received:
        raise Interrupted(_signals_received[0])


def _numba_finalizer(unraisable) -> bool:
    """True for the KeyError numba's dispatcher finalizer raises as FFCV's compiled pipelines
    are collected (numba 0.6x): harmless, yet printed as a traceback after every photo run."""
    frame = unraisable.exc_traceback
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return (isinstance(unraisable.exc_value, KeyError) and frame is not None
            and frame.tb_frame.f_code.co_name == "finalizer"
            and Path(frame.tb_frame.f_code.co_filename).parts[-3:] == ("numba", "core",
                                                                        "dispatcher.py"))


def leave_signals_to_the_parent() -> None:
    """Pool initializer: a forked worker drops the handlers fasttt gave its parent.

    Inherited, they raise inside multiprocessing's own locks when the pool terminates its
    workers (SIGTERM), and the parent then waits for them forever. Ctrl-C reaches the
    parent, which stops the pool.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def exit_at_once_on_interrupt() -> None:
    """Until `exit_on_user_error` takes over (imports), and once it has handed the signals
    back (the interpreter's exit), a signal ends the process quietly: one line, 128 + its
    number."""
    def leave(signum, frame):
        _leave(signum)

    for signum in _handled_signals():
        signal.signal(signum, leave)


def _handled_signals() -> list[int]:
    """SIGINT, SIGTERM, and SIGHUP unless nohup asked to ignore it."""
    handled = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        handled.append(signal.SIGHUP)  # a closed terminal: stop as cleanly as on SIGTERM
    return handled


def exit_on_user_error(main):
    """Run `main()`; a UserError or an OS error becomes `error: ...` on stderr and exit 2.

    SIGINT, SIGTERM and SIGHUP become `interrupted: ...` and exit 130, 143 or 129, wherever
    they land, until `main` says its results are complete (`results_complete`).
    """
    _complete.clear()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, _interrupt) for signum in _handled_signals()}
    print_unraisable = sys.unraisablehook

    def unless_known(unraisable):
        # A signal swallowed by a callback is recorded and raised again: no traceback.
        if not isinstance(unraisable.exc_value, Interrupted) and not _numba_finalizer(unraisable):
            print_unraisable(unraisable)

    sys.unraisablehook = unless_known
    try:
        result = main()
        if not _complete:  # else a signal came once the results were whole: nothing to stop
            raise_if_interrupted()
        return result
    except UserError as err:
        message = str(err)
    except OSError as err:  # disk full, permissions, a path that is a file: the user's to fix
        where = f": {err.filename}" if err.filename else ""
        message = f"{err.strerror or err}{where}"
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            message += " (free space on that disk, then rerun the same command)"
    except KeyboardInterrupt:
        print(RESUME_HINT, file=sys.stderr)
        raise SystemExit(128 + (_signals_received or [signal.SIGINT])[0]) from None
    finally:
        gc.collect()  # loaders die now, while their finalizers' noise is still dropped
        sys.unraisablehook = print_unraisable
        for signum, handler in previous.items():  # a caller in this process gets its own back
            signal.signal(signum, handler)
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
