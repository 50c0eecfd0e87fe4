"""The processes a tune starts (MetaSchedule's popen build/run workers), ended on every exit.

Three ways out, three guards:

* normal end, Ctrl-C, an error: :func:`end_children` (in ``tune``'s ``finally``) terminates
  then kills every live descendant of this process;
* a second Ctrl-C ("stop now"): :func:`stop_now` does the same and leaves with ``os._exit``
  (raising from a signal handler while MetaSchedule's C++ is on the stack ends in
  ``std::terminate``, a core dump);
* SIGKILL of the tune, which runs no code of ours: each worker runs :func:`watch_parent`
  (the pools' ``initializer``), a daemon thread that ends the worker once its parent is gone
  (a busy worker would otherwise finish its candidate first, then notice the closed pipe).

Example::

    >>> end_children(timeout_s=1.0)  # doctest: +SKIP
    []
"""

from __future__ import annotations

import os
import sys
import threading
import time


def child_pids() -> set[int]:
    """The pids of this process's descendants now (what :func:`end_children` must spare:
    an in-process caller may have started processes of its own, e.g. an RPC tracker)."""
    import psutil

    try:
        return {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()


def end_children(*, keep: set[int] = frozenset(), timeout_s: float = 3.0) -> list[int]:
    """Terminate, then kill, every descendant process not in ``keep``; returns their pids."""
    import psutil

    try:
        children = [p for p in psutil.Process().children(recursive=True) if p.pid not in keep]
    except psutil.Error:
        return []
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)
    return [c.pid for c in children]


def stop_now(message: str, *, keep: set[int] = frozenset(), code: int = 130) -> None:
    """End the children (but ``keep``) and this process at once, with ``code`` (from a
    signal handler: the process ends, an in-process caller included; it asked for it)."""
    try:
        print(message, file=sys.stderr, flush=True)
        end_children(keep=keep, timeout_s=2.0)
        sys.stdout.flush()
    finally:
        os._exit(code)


def watch_parent(poll_s: float = 0.5) -> None:
    """Worker initializer: end this worker soon after its parent exits (even by SIGKILL)."""
    parent = os.getppid()

    def _watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:  # re-parented: the tune is gone
                os._exit(0)

    threading.Thread(target=_watch, name="tvm_ternary-parent-watch", daemon=True).start()
