"""The fork server: a single-threaded process that forks workers, reports their deaths, and
cleans up when the supervisor dies.

Why: forking the supervisor itself is unsafe once it runs threads (the manager thread, the
caller's threads, ORT pools): a child can inherit a lock held by a thread that does not exist in
it and deadlock. Spawning fresh interpreters instead would re-import numpy, onnx and our code per
worker (about 0.3 s each) and re-run the caller's ``__main__``. So the supervisor starts this
small process once per engine, with a fresh interpreter that preloads numpy, onnx and our worker
code and never starts a thread; every worker, including respawns, is a fork of it.

onnxruntime is *not* preloaded: importing it (1.31) starts a background thread of ORT's own, and
a fork taken while that thread holds one of ORT's locks would leave the child waiting on it for
ever. Each worker imports onnxruntime after its fork instead: measured with a 448 MiB model,
4 workers start in 1.09x the time of one (1.03x before) and each costs 6-8 MiB more PSS.
(Loading ORT's library here with ``dlopen`` but importing it only in the workers was tried: it
saved neither.) ``import numpy`` would start OpenBLAS's thread pool, but the supervisor starts
this process with ``OPENBLAS_NUM_THREADS=1`` and the other thread-count variables, so it runs
exactly one thread, which a test checks.

::

    supervisor ──(SEQPACKET socket: spawn / kill / shutdown + descriptors)──▶ fork server
         ▲                                                                      │ fork()
         └──────────(spawned pid / exited pid + exit code)──────────────────────┤
                                                                                ▼
                                                                        worker processes

The fork server reaps its children (SIGCHLD), so it is the one that knows how each died, and
tells the supervisor. When the supervisor dies its socket reads EOF: the fork server kills every
worker, removes the weights segment's name from ``/dev/shm`` (and the prepacked model files
named after it, ``sharedmem.unlink_segment``) and exits. Workers die with the
fork server too (``PR_SET_PDEATHSIG``), so nothing outlives a ``kill -9`` of either.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import traceback

from shmengine.runtime.messages import KillWorker, ShutdownForkServer, SpawnWorker, WorkerExited, WorkerSpawned

__all__ = ["ForkServer", "serve"]

_MAX_MESSAGE = 1 << 16
_MAX_FDS = 8
PR_SET_PDEATHSIG = 1


class ForkServer:
    """Supervisor side: starts the fork server process and speaks its protocol."""

    def __init__(self, owned_segments: list[str], environment: dict[str, str]):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # the directory holding the shmengine package (this file is shmengine/runtime/zygote.py)
        package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        # The fork server sees the caller's import path, so programs defined in the caller's
        # own modules can run in workers.
        paths = [package_parent] + [p for p in sys.path if p]
        code = "import sys, json; sys.path[:0] = json.loads(sys.argv[1]); from shmengine.runtime.zygote import serve; serve()"
        env = dict(os.environ)
        env.update(environment)
        env["SHMENGINE_ZYGOTE_FD"] = str(theirs.fileno())
        env["SHMENGINE_OWNED_SEGMENTS"] = json.dumps(owned_segments)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code, json.dumps(paths)],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.sock = ours

    def fileno(self) -> int:
        return self.sock.fileno()

    def _send(self, message, fds=()) -> None:
        socket.send_fds(self.sock, [pickle.dumps(message)], list(fds))

    def spawn(self, slot: int, generation: int, fds: list[int]) -> None:
        self._send(SpawnWorker(slot, generation), fds)

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        self._send(KillWorker(pid, int(sig)))

    def receive(self) -> WorkerSpawned | WorkerExited | None:
        """One report (``messages.WorkerSpawned`` / ``WorkerExited``), or None at EOF."""
        data = self.sock.recv(_MAX_MESSAGE)
        return pickle.loads(data) if data else None

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the fork server to kill its workers and exit; make sure it did."""
        try:
            self._send(ShutdownForkServer())
        except OSError:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.sock.close()


# --------------------------------------------------------------------------------------------
# The fork server process


def _set_parent_death_signal() -> None:
    """Ask the kernel to SIGKILL this process when its parent (the fork server) dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the worker still exits at socket EOF
        pass


def _exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status)


def serve() -> None:
    """Main loop of the fork server process (started by :class:`ForkServer`)."""
    control = socket.socket(fileno=int(os.environ.pop("SHMENGINE_ZYGOTE_FD")))
    owned = json.loads(os.environ.pop("SHMENGINE_OWNED_SEGMENTS"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle

    # Preload what every worker imports, once, before any fork; not onnxruntime (module docstring).
    import numpy  # noqa: F401

    from shmengine.runtime import worker as worker_module
    from shmengine.runtime.sharedmem import unlink_segment

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the handler only exists to wake select()
    children: dict[int, tuple[int, int]] = {}  # pid -> (slot, generation)
    me = os.getpid()

    def report(message) -> None:
        try:
            control.send(pickle.dumps(message))
        except OSError:
            pass  # the supervisor is gone; the EOF on the next read ends us

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot, generation = children.pop(pid, (-1, -1))
            report(WorkerExited(slot, generation, pid, _exit_code(status)))

    def end(kill_signal: int) -> None:
        for pid in list(children):
            try:
                os.kill(pid, kill_signal)
            except ProcessLookupError:
                pass
        for pid in list(children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        for name in owned:
            unlink_segment(name)
        os._exit(0)

    # A SIGTERM or SIGHUP sent to the whole process group (kill -- -PGID, timeout -s TERM, systemd,
    # a closed terminal) reaches us and the workers too. It is the supervisor's to act on: it may
    # finish the line it is writing and close the engine (shmengine-run exits 130 with complete
    # lines), or die of it, which closes our socket and takes everything down below. Were we or
    # the workers to die of it first, the supervisor would see a broken engine instead.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)

    while True:
        try:
            readable, _, _ = select.select([control, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in readable:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
            reap()
        if control not in readable:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(control, _MAX_MESSAGE, _MAX_FDS)
        except ConnectionResetError:
            data, fds = b"", []
        if not data:  # the supervisor died (or closed us without a word): take everything down
            end(signal.SIGKILL)
        message = pickle.loads(data)
        if isinstance(message, SpawnWorker):
            slot, generation = message.slot, message.generation
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    control.close()
                    signal.set_wakeup_fd(-1)
                    os.close(wake_r)
                    os.close(wake_w)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # SIGINT/TERM/HUP stay ignored: see above
                    _set_parent_death_signal()
                    if os.getppid() != me:  # the fork server died before prctl took effect
                        os._exit(1)
                    code = worker_module.worker_main(*fds)
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            for fd in fds:
                os.close(fd)
            children[pid] = (slot, generation)
            report(WorkerSpawned(slot, generation, pid))
        elif isinstance(message, KillWorker):
            pid, sig = message.pid, message.signal
            if pid in children:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        elif isinstance(message, ShutdownForkServer):
            end(signal.SIGKILL)
