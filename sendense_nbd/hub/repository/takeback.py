"""``python -m sendense_nbd.hub.repository.takeback ROOT VM_PATH DISK_KEY ...``: break the locks a lost hub's
Ceph clients hold on these disks' images, in a process of its own.

A hub that takes a lost one over breaks those locks (blocklisting the dead clients) so that its next rollback
works at once. Done in the hub's own process, next to its long-lived Ceph clients, librados 16 aborted the hub
(``std::system_error``) in most runs of the three-hub test; a short-lived process does it instead. Prints the
images whose lock was broken as a JSON list; exit status 1 with a sentence on stderr when it cannot.
"""

from __future__ import annotations

import json
import sys

from sendense_nbd.errors import SendenseError
from sendense_nbd.hub.repository.stores import open_store


def main(argv: list[str]) -> int:
    """Break the locks of ``ROOT``'s store on the disks ``VM_PATH DISK_KEY`` pairs name."""
    root, rest = argv[0], argv[1:]
    disks = [(rest[i], int(rest[i + 1])) for i in range(0, len(rest) - 1, 2)]
    store = open_store(root, None)
    try:
        print(json.dumps(store.reclaim(disks)))
    except SendenseError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
