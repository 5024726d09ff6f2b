"""Which store a hub's directory uses: the local qcow2 files (the default) or an RBD pool, recorded in
``ROOT/store.json`` so that the directory is never used with another repository, and so that the
offline commands (``points``, ``restore``) given only the directory find the store."""

from __future__ import annotations

import functools
import json
import os

from sendense_nbd.errors import RepositoryError
from sendense_nbd.hub.repository.local import LocalStore
from sendense_nbd.hub.repository.rbd import RbdLocation, RbdStore, parse_location
from sendense_nbd.hub.repository.store import Store
from sendense_nbd.storage.files import temporary_name

#: The record of a directory's RBD store (no secrets: the conf and keyring paths, the user's name).
RECORD = "store.json"


def _recorded(root: str) -> tuple[RbdLocation | None, str | None]:
    """The RBD store recorded in ``root`` and its repository's UUID (None: none is)."""
    try:
        with open(os.path.join(root, RECORD), encoding="utf-8") as f:
            record = json.load(f)
        identity = record.get("repository")
        if identity is not None and not isinstance(identity, str):
            raise TypeError(f"repository is {identity!r}, not a UUID")
        return parse_location(record["rbd"]), identity
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RepositoryError(f"{os.path.join(root, RECORD)} cannot be read: {exc}") from exc


def _record(root: str, location: RbdLocation, identity: str | None) -> None:
    """Write the record atomically (a temporary file renamed over it)."""
    path = os.path.join(root, RECORD)
    temporary = temporary_name(path)
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"rbd": location.url, **({"repository": identity} if identity else {})}, f)
        f.write("\n")
    os.replace(temporary, path)


def _same(a: RbdLocation, b: RbdLocation) -> bool:
    """The same repository: pool, namespace and prefix (the conf, user and keyring may change)."""
    return (a.pool, a.namespace, a.prefix) == (b.pool, b.namespace, b.prefix)


def open_store(root: str, location: str | None) -> Store:
    """The store of the hub directory ``root``: ``location`` (an ``rbd://`` URL, then recorded in ``root``),
    else what ``root`` records, else the local store in ``root``. A directory holding another repository's
    state is refused (:class:`RepositoryError`)."""
    recorded, identity = _recorded(root)
    if location is None:
        return LocalStore(root) if recorded is None else RbdStore(recorded, root, identity=identity)
    wanted = parse_location(location)
    if recorded is not None and not _same(recorded, wanted):
        raise RepositoryError(
            f"{root} is the directory of another RBD repository ({recorded.url}, prefix {recorded.prefix}): "
            f"give each repository its own --state-dir"
        )
    if recorded is None and os.path.exists(os.path.join(root, "hub.db")):
        raise RepositoryError(f"{root} holds a local repository's hub.db: give the RBD repository its own --state-dir")
    fresh = recorded is None or not os.path.exists(os.path.join(root, "hub.db"))
    _record(root, wanted, identity)
    return RbdStore(wanted, root, identity=identity, fresh=fresh, record=functools.partial(_record, root, wanted))
