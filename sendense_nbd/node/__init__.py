"""The node (VMware side): an API the hub calls to run backup jobs in-process.

:mod:`~sendense_nbd.node.config` reads the node's TOML configuration (vCenter
credentials stay there); :mod:`~sendense_nbd.node.service` runs jobs wired by
:func:`sendense_nbd.backup.prepare` and keeps them in a
:class:`~sendense_nbd.node.jobs.JobTable`; :mod:`~sendense_nbd.node.api` is the
aiohttp layer (docs/NODE_API.md): it parses requests with
:mod:`~sendense_nbd.node.requests` and maps the service's errors to statuses.
"""
