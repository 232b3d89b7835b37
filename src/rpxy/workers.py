"""``rpxy --workers N`` (or ``workers = N``): N worker processes under one supervisor.

Why processes: one CPython process serves on one core (the GIL), so using more cores
means more processes. Each worker is an ordinary ``rpxy`` process started again with
``subprocess`` (never ``fork``: a forked child would inherit the parent's reactor, its
file descriptors and its threads half-copied) and marked as a worker by environment
variables. A worker builds the normal service and opens every proxy listener (TCP and
the HTTP/3 UDP port) with ``SO_REUSEPORT``: each worker has its own socket on the same
address, and the kernel spreads new connections (TCP) and datagrams (UDP, by the
4-tuple hash) between them. Nothing is passed between the processes: each one reads the
config file, so the sticky-cookie key (``sticky_cookie_secret``, which
``load_balance = "sticky"`` requires) is the same in all of them, and each one watches
the file for changes itself.

The supervisor (this module's :class:`Supervisor`, the process the user started) runs
no reactor: it starts the workers, waits for each one to say it is ready (a byte on a
pipe, after its listeners are bound), restarts one that dies (with a backoff when it
keeps dying quickly), forwards SIGHUP (reload) and SIGTERM/SIGINT (graceful stop) to
every worker, and exits 0 once all of them are gone. Workers run in their own process
group, so a Ctrl-C on a terminal reaches them once, through the supervisor (a second
signal cuts the requests still in flight, as without workers); and they ask the kernel
for a SIGTERM should the supervisor die without stopping them (``PR_SET_PDEATHSIG``).

See docs/operations.md ("Workers") for what an operator sees.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.logger import Logger

log = Logger(namespace="rpxy.workers")

#: The worker's index (0..N-1): set by the supervisor, its presence makes ``rpxy`` a worker.
ENV_WORKER = "RPXY_WORKER"
#: The write end of the pipe on which the worker reports that it is serving.
ENV_READY_FD = "RPXY_WORKER_READY_FD"
#: The supervisor's PID: a worker whose parent is already gone exits at once.
ENV_SUPERVISOR = "RPXY_SUPERVISOR_PID"

#: Seconds a worker has to finish after SIGTERM beyond ``graceful_shutdown_timeout``
#: (the drain's own abort grace, closing the logs) before the supervisor kills it.
STOP_MARGIN = 15.0

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# -- pure parts ---------------------------------------------------------------------------


def worker_index(environ: Mapping[str, str]) -> int | None:
    """This process's worker index when a supervisor started it, else None."""
    text = environ.get(ENV_WORKER)
    if text is None:
        return None
    try:
        index = int(text)
    except ValueError:
        return None
    return index if index >= 0 else None


def worker_command(argv: Sequence[str], python: str = sys.executable) -> list[str]:
    """The command line of a worker: the same interpreter and the same ``rpxy`` arguments.

    ``--workers`` may stay in it: a process started with :data:`ENV_WORKER` is a worker
    whatever the count says. Nothing secret is ever put on this line (``ps`` shows it).
    """
    return [python, "-m", "rpxy.cli", *argv]


def worker_env(base: Mapping[str, str], index: int, *, ready_fd: int, supervisor_pid: int) -> dict[str, str]:
    """The environment of worker ``index``: the supervisor's own plus the worker markers."""
    env = dict(base)
    env[ENV_WORKER] = str(index)
    env[ENV_READY_FD] = str(ready_fd)
    env[ENV_SUPERVISOR] = str(supervisor_pid)
    return env


class Backoff:
    """How long to wait before restarting a worker that exited.

    A worker that ran for at least ``stable`` seconds is restarted after ``initial``
    seconds; each further exit within ``stable`` seconds of its start doubles the delay,
    up to ``maximum``, so a worker that cannot start (an invalid config file, a port
    taken by another program) is retried without spinning the CPU.
    """

    def __init__(self, initial: float = 0.2, maximum: float = 30.0, stable: float = 10.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.stable = stable
        self.streak = 0

    def next_delay(self, ran_for: float) -> float:
        """The delay before the next start, given how long the exited worker ran."""
        if ran_for >= self.stable:
            self.streak = 0
        delay = min(self.maximum, self.initial * (2**self.streak))
        self.streak += 1
        return delay


def describe_exit(returncode: int) -> str:
    """``exit status 1`` or ``killed by SIGKILL`` (Popen: negative = the signal number)."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


# -- the worker's side --------------------------------------------------------------------


def die_with_supervisor(environ: Mapping[str, str] = os.environ) -> None:
    """Ask for SIGTERM when the supervisor dies (Linux), and exit if it already has.

    Without it a supervisor killed with SIGKILL would leave its workers serving with
    nobody to stop them. SIGTERM (not SIGKILL) so that they still drain gracefully.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    expected = environ.get(ENV_SUPERVISOR)
    if expected is not None and expected.isdigit() and os.getppid() != int(expected):
        sys.exit(0)


def report_ready(environ: Mapping[str, str] = os.environ) -> None:
    """Tell the supervisor that this worker's listeners are open (one write, then close)."""
    text = environ.get(ENV_READY_FD)
    if text is None or not text.isdigit():
        return
    fd = int(text)
    try:
        os.write(fd, b"ready\n")
    except OSError:
        pass
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


class TaggedLines:
    """The system log stream of worker ``index``: each line says which worker wrote it.

    Workers share ``rpxy.log`` (or stdout); ``<time> <LEVEL> <namespace>: <text>`` becomes
    ``<time> <LEVEL> <namespace>: [worker 1] <text>``, so ``grep '\\[worker 1\\]'`` follows one.
    """

    def __init__(self, stream: Any, index: int) -> None:
        self.stream = stream
        self.tag = f"[worker {index}] "

    def write(self, text: str) -> int:
        head, sep, rest = text.partition(": ")
        return self.stream.write(f"{head}{sep}{self.tag}{rest}" if sep else text)

    def flush(self) -> None:
        self.stream.flush()


# -- the supervisor ---------------------------------------------------------------------------


class _Slot:
    """One worker position: its current process (or the time it is due to restart)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_fd: int | None = None
        self.ready = False
        self.ever_ready = False
        self.restart_at: float | None = None
        self.backoff = Backoff()


class Supervisor:
    """Starts ``count`` workers, keeps them running, forwards signals; :meth:`run` blocks.

    ``spawn(index, ready_fd)`` starts worker ``index`` with the write end of its
    readiness pipe (``ready_fd``) inherited: :func:`spawn_worker` makes the real one, tests
    pass stand-ins.
    ``stop_timeout``: seconds the workers get after SIGTERM before SIGKILL.
    """

    def __init__(
        self,
        count: int,
        spawn: Callable[[int, int], subprocess.Popen[bytes]],
        *,
        stop_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.count = count
        self.spawn = spawn
        self.stop_timeout = stop_timeout
        self.clock = clock
        self.slots = [_Slot(index) for index in range(count)]
        self.stopping = False
        self.stop_deadline: float | None = None
        self.all_ready_logged = False
        self._signals: list[int] = []

    # signals are only recorded in the handler; the loop acts on them
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals.append(signum)

    def pids(self) -> list[int]:
        return [slot.proc.pid for slot in self.slots if slot.proc is not None]

    def run(self) -> int:
        """Run until every worker is gone after a stop signal (0), or the first start fails (1)."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        previous_wakeup = signal.set_wakeup_fd(wake_w)
        previous = {signum: signal.signal(signum, self._on_signal) for signum in (*_FORWARDED, signal.SIGCHLD)}
        try:
            log.info("starting {count} workers (supervisor pid {pid})", count=self.count, pid=os.getpid())
            for slot in self.slots:
                self._start(slot)
            return self._loop(wake_r)
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(wake_r)
            os.close(wake_w)
            for slot in self.slots:
                self._close_ready(slot)

    def _loop(self, wake_r: int) -> int:
        while True:
            now = self.clock()
            timeout = 1.0
            for slot in self.slots:
                if slot.restart_at is not None:
                    timeout = min(timeout, max(0.0, slot.restart_at - now))
            fds = [wake_r, *(slot.ready_fd for slot in self.slots if slot.ready_fd is not None)]
            try:
                readable, _, _ = select.select(fds, [], [], timeout)
            except InterruptedError:  # pragma: no cover (PEP 475 retries)
                readable = []
            if wake_r in readable:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            for slot in self.slots:
                if slot.ready_fd is not None and slot.ready_fd in readable:
                    self._read_ready(slot)
            self._handle_signals()
            status = self._reap()
            if status is not None:
                return status
            self._restart_due()
            if self.stopping and not self.pids():
                log.info("all workers stopped")
                return 0
            if self.stopping and self.stop_deadline is not None and self.clock() >= self.stop_deadline:
                for pid in self.pids():
                    log.warn("worker pid {pid} still running {t:g} s after SIGTERM: killing it", pid=pid, t=self.stop_timeout)
                    _kill(pid, signal.SIGKILL)
                self.stop_deadline = None

    def _start(self, slot: _Slot) -> None:
        read_fd, write_fd = os.pipe()
        try:
            proc = self.spawn(slot.index, write_fd)
        except OSError as error:
            os.close(read_fd)
            log.error("worker {i}: cannot start: {error}", i=slot.index, error=error)
            slot.restart_at = self.clock() + slot.backoff.next_delay(0.0)
            return
        finally:
            os.close(write_fd)
        slot.proc = proc
        slot.started_at = self.clock()
        slot.ready = False
        slot.ready_fd = read_fd
        slot.restart_at = None
        log.info("worker {i} started (pid {pid})", i=slot.index, pid=proc.pid)

    def _close_ready(self, slot: _Slot) -> None:
        if slot.ready_fd is not None:
            os.close(slot.ready_fd)
            slot.ready_fd = None

    def _read_ready(self, slot: _Slot) -> None:
        assert slot.ready_fd is not None
        try:
            data = os.read(slot.ready_fd, 64)
        except OSError:
            data = b""
        if data.startswith(b"ready"):
            slot.ready = slot.ever_ready = True
            log.info("worker {i} (pid {pid}) ready", i=slot.index, pid=slot.proc.pid if slot.proc else "-")
            if not self.all_ready_logged and all(s.ready for s in self.slots):
                self.all_ready_logged = True
                log.info("all {count} workers ready", count=self.count)
        self._close_ready(slot)  # one message per worker; EOF without it is noticed by _reap

    def _handle_signals(self) -> None:
        pending, self._signals = self._signals, []
        for signum in pending:
            if signum == signal.SIGCHLD:
                continue
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                # Only to the workers that are serving: one still starting has no SIGHUP
                # handler yet (the signal would kill it) and reads the file as it starts.
                ready = [slot.proc.pid for slot in self.slots if slot.proc is not None and slot.ready]
                if not self.stopping:
                    log.info("SIGHUP: reloading {n} workers", n=len(ready))
                    for pid in ready:
                        _kill(pid, signum)
                continue
            if not self.stopping:
                self.stopping = True
                self.stop_deadline = self.clock() + self.stop_timeout
                log.info("{name}: stopping {n} workers", name=name, n=len(self.pids()))
            else:
                log.info("{name} again: workers cut the requests still in flight", name=name)
            self._forward(signum)

    def _forward(self, signum: int) -> None:
        for pid in self.pids():
            _kill(pid, signum)

    def _reap(self) -> int | None:
        for slot in self.slots:
            proc = slot.proc
            if proc is None:
                continue
            returncode = proc.poll()
            if returncode is None:
                continue
            slot.proc = None
            self._close_ready(slot)
            if self.stopping:
                log.info("worker {i} (pid {pid}) stopped: {how}", i=slot.index, pid=proc.pid, how=describe_exit(returncode))
                continue
            if not slot.ever_ready and not self.all_ready_logged:
                # The first start failed (a port in use, a certificate that cannot be read):
                # fail loudly, as a single rpxy process would, rather than retry forever.
                log.error(
                    "worker {i} (pid {pid}) failed to start ({how}); stopping", i=slot.index, pid=proc.pid,
                    how=describe_exit(returncode),
                )
                self.stopping = True
                self._forward(signal.SIGTERM)
                for other in self.slots:
                    if other.proc is not None:
                        try:
                            other.proc.wait(self.stop_timeout)
                        except subprocess.TimeoutExpired:
                            other.proc.kill()
                            other.proc.wait()
                        other.proc = None
                return 1
            ran_for = self.clock() - slot.started_at
            delay = slot.backoff.next_delay(ran_for)
            slot.restart_at = self.clock() + delay
            log.warn(
                "worker {i} (pid {pid}) exited ({how}) after {ran:.1f} s; restarting it in {delay:g} s",
                i=slot.index, pid=proc.pid, how=describe_exit(returncode), ran=ran_for, delay=delay,
            )
        return None

    def _restart_due(self) -> None:
        if self.stopping:
            return
        now = self.clock()
        for slot in self.slots:
            if slot.proc is None and slot.restart_at is not None and now >= slot.restart_at:
                self._start(slot)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def spawn_worker(argv: Sequence[str]) -> Callable[[int, int], subprocess.Popen[bytes]]:
    """``spawn`` for :class:`Supervisor`: ``python -m rpxy.cli ARGV`` as worker ``index``.

    Its own process group (in the supervisor's session, so tools that follow a session,
    such as bench/run.py, still see it), so that a terminal's Ctrl-C reaches it only
    through the supervisor; stdin from /dev/null; stdout and stderr inherited.
    """
    command = worker_command(argv)
    supervisor_pid = os.getpid()

    def spawn(index: int, ready_fd: int) -> subprocess.Popen[bytes]:
        env = worker_env(os.environ, index, ready_fd=ready_fd, supervisor_pid=supervisor_pid)
        return subprocess.Popen(
            command, env=env, pass_fds=(ready_fd,), process_group=0, stdin=subprocess.DEVNULL
        )

    return spawn


def run_supervisor(argv: Sequence[str], count: int, *, log_dir: str | None, graceful_shutdown_timeout: float) -> int:
    """The ``rpxy`` process under ``--workers N``: system log to ``log_dir``, then supervise."""
    from rpxy.logs import open_system_log, start_system_logging

    try:
        stream = open_system_log(log_dir)
    except OSError as error:
        print(f"rpxy: cannot use log directory {log_dir}: {error.strerror or error}", file=sys.stderr)
        return 1
    start_system_logging(stream)
    supervisor = Supervisor(count, spawn_worker(argv), stop_timeout=graceful_shutdown_timeout + STOP_MARGIN)
    return supervisor.run()
