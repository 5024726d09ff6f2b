"""The hub (backup side): port pool, NBD exports, the qcow2 repository, jobs and the REST API.

:mod:`~sendense_nbd.hub.service` wires :mod:`~sendense_nbd.hub.ports`,
:mod:`~sendense_nbd.hub.exports`, :mod:`~sendense_nbd.hub.repository` and
:mod:`~sendense_nbd.hub.jobs` (all kept in one SQLite store,
:mod:`~sendense_nbd.hub.db`); :mod:`~sendense_nbd.hub.api` is the aiohttp
layer over it.
"""
