"""Running the Streamlit app as a child of `workbench report`: in its own process group, stopped with
that group when the command is told to stop (SIGTERM, SIGHUP, Ctrl-C), so that no server outlives it."""
from __future__ import annotations

import os
import signal
import subprocess
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def run_child(args: list[str], grace: float = 10.0) -> int:
    """Run `args` to its end and return its exit status; after a stop signal, 128 + its number (as a
    shell reports a signalled command) once the child's group has been ended."""
    proc = subprocess.Popen(args, start_new_session=True)  # its own group: Ctrl-C reaches it through us
    stopped: list[int] = []
    kill_later = threading.Timer(grace, signal_group, (proc.pid, signal.SIGKILL))
    kill_later.daemon = True

    def stop(signum, frame):
        # Signals only: the main thread is inside proc.wait(), which holds the Popen's wait lock, so a
        # wait here would never return.
        if not stopped:
            stopped.append(signum)
            signal_group(proc.pid, signal.SIGTERM)
            kill_later.start()

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:  # left by an exception: stop it all the same
            signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
    kill_later.cancel()
    if stopped:
        signal_group(proc.pid, signal.SIGKILL)  # whatever of its group ignored SIGTERM
        return 128 + stopped[0]
    return code


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the group is gone already
        pass
