"""Waiting for vSphere tasks with the PropertyCollector (no polling, no stdout).

pyVim's ``WaitForTask`` blocks in its own loop and in some paths prints;
this waiter watches ``info`` with ``WaitForUpdatesEx`` through a filter on
the session's collector. It runs in the session's worker thread.

Each wait costs the filter's creation and one ``WaitForUpdatesEx`` per
update. The filter is not destroyed after (one round trip saved per task):
a finished task never changes again, the waiter only reads its own task's
updates, and vCenter drops a session's filters at logout. A job's session
holds at most a handful (one per task: CBT on, snapshots taken and removed).
"""

from __future__ import annotations

import time
from typing import Any

from sendense_nbd.errors import VSphereError


def fault_message(error: Any) -> str:
    """A one-line message from a vim fault or a task's ``info.error``."""
    text = getattr(error, "localizedMessage", None) or getattr(error, "msg", None) or str(error)
    faults = getattr(error, "faultMessage", None) or []
    extra = "; ".join(m.message for m in faults if getattr(m, "message", None))
    text = " ".join(str(text).split()) or type(error).__name__
    return f"{text} ({extra})" if extra else text


def wait_for_task(content: Any, task: Any, what: str, *, timeout: float = 3600.0) -> Any:
    """Wait until ``task`` ends; its result, or :class:`VSphereError` naming ``what``.

    A filter on the session's own collector (``content.propertyCollector``),
    left for the logout to remove: one round trip plus one per update. Only
    the session's single worker thread waits on that collector.
    """
    from pyVmomi import vim, vmodl

    collector = content.propertyCollector
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=task)],
        propSet=[vmodl.query.PropertyCollector.PropertySpec(type=vim.Task, pathSet=["info"], all=False)],
    )
    deadline = time.monotonic() + timeout
    collector.CreateFilter(spec, True)
    info = _wait_for_info(collector, task, deadline, what, timeout)
    if info.state == vim.TaskInfo.State.error:
        raise VSphereError(f"{what} failed: {fault_message(info.error)}")
    return info.result


def _wait_for_info(collector: Any, task: Any, deadline: float, what: str, timeout: float) -> Any:
    """``task``'s final ``info``, from ``WaitForUpdatesEx`` on ``collector`` (other tasks' updates ignored)."""
    from pyVmomi import vim, vmodl

    version = ""
    info = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise VSphereError(f"{what}: the task did not finish within {timeout:.0f} s")
        options = vmodl.query.PropertyCollector.WaitOptions(maxWaitSeconds=max(1, min(60, int(left))))
        update = collector.WaitForUpdatesEx(version, options)
        if update is None:
            continue
        version = update.version
        for filter_set in update.filterSet:
            for object_set in filter_set.objectSet:
                if object_set.obj != task:
                    continue
                for change in object_set.changeSet or []:
                    if change.name == "info":
                        info = change.val
        if info is not None and info.state in (vim.TaskInfo.State.success, vim.TaskInfo.State.error):
            return info
