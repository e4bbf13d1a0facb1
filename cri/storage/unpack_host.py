"""The unpack host: one process that has imported the extractor and forks each unpack worker from itself.

    python -S -m cri.storage.unpack_host      (fd 0: a SOCK_SEQPACKET socket to the daemon)

An unpack worker exec'd for a pull starts a fresh interpreter: ~30 ms of CPU, and on a cold page cache (a
node that has run a while) the reads of every module it imports, while the pull's first layer waits. The
daemon itself cannot fork (it has threads); this process has none, so a fork of it is a worker that is
ready at once (under 1 ms).

The protocol (cri/storage/unpack_process is the other side), one message per packet:
- the daemon asks for a worker: b"W", with three descriptors (SCM_RIGHTS): the worker's stdin, stdout and
  stderr;
- the host answers b"S" + the worker's pid, with a pidfd of it (which the daemon signals it through, free of
  pid reuse);
- or, if it could not fork the worker or hand it over, b"E" + the error's text;
- and when a worker exits, b"X" + its pid and status (as asyncio gives a returncode: the exit code, or minus
  the signal that killed it).
The host exits when the daemon closes its end, and dies with the daemon (PR_SET_PDEATHSIG); its workers
die with it the same way.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
import sys

from cri.storage import unpack_worker

ASK, STARTED, FAILED, EXITED = b"W", b"S", b"E", b"X"
PID = struct.Struct(">i")
EXIT = struct.Struct(">ii")  # pid, status
MESSAGE_MAX = 4096
_PR_SET_NAME = 15
_WORKER_FDS = 3


def _name_this_process(name: bytes) -> None:
    """What ps and top show (comm): the host and its workers would all read `python3` otherwise."""
    ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


class Host:
    def __init__(self, control: socket.socket) -> None:
        self.control = control

    def serve(self) -> int:
        signal.signal(signal.SIGCHLD, self._reap)
        while True:
            message, fds, _flags, _address = socket.recv_fds(self.control, MESSAGE_MAX, _WORKER_FDS)
            if not message:
                return 0  # the daemon closed its end
            if message != ASK or len(fds) != _WORKER_FDS:
                for fd in fds:
                    os.close(fd)
                self.control.send(FAILED + f"bad request {message[:32]!r} with {len(fds)} descriptors".encode())
                continue
            self._fork_worker(fds)

    def _fork_worker(self, fds: list[int]) -> None:
        # SIGCHLD waits until the pidfd is open and the answer sent: the reaper must not take the pid first,
        # and the daemon must read the worker's start before its exit.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        parent = os.getpid()
        try:
            try:
                pid = os.fork()
            except OSError as exc:
                self.control.send(FAILED + f"fork: {exc}".encode())
                return
            if pid == 0:
                self._become_worker(fds, parent)
            self._announce(pid)
        finally:
            for fd in fds:
                os.close(fd)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})

    def _announce(self, pid: int) -> None:
        """Hand the daemon the worker's pidfd; a worker that cannot be handed is stopped, the request failed."""
        try:
            pidfd = os.pidfd_open(pid)
            try:
                socket.send_fds(self.control, [STARTED + PID.pack(pid)], [pidfd])
            finally:
                os.close(pidfd)
        except ConnectionError:
            raise  # the daemon is gone: so is this host, and the worker with it
        except OSError as exc:  # out of descriptors, or memory: this worker fails, not the ones running
            os.kill(pid, signal.SIGKILL)  # still this child's pid: SIGCHLD is blocked, nothing has reaped it
            self.control.send(FAILED + f"handing over the worker: {exc}".encode())

    def _become_worker(self, fds: list[int], parent: int) -> None:
        """In the child: its pipes made stdin, stdout and stderr, then the worker's loop; it never returns."""
        code = unpack_worker.EXIT_FAILED
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            self.control.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            _name_this_process(b"unpack-worker")
            code = unpack_worker.main(parent)
        except BaseException:
            sys.excepthook(*sys.exc_info())  # the traceback an interpreter would print on its way out
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def _reap(self, _signum: int, _frame: object) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            try:
                self.control.send(EXITED + EXIT.pack(pid, code))
            except OSError:
                return  # the daemon is gone; so will this process be


def main() -> int:
    unpack_worker.die_with_the_parent()
    _name_this_process(b"unpack-host")
    control = socket.socket(fileno=0)
    try:
        return Host(control).serve()
    except (ConnectionError, EOFError):
        return 0
    finally:
        control.close()


if __name__ == "__main__":
    sys.exit(main())
