"""The node (VMware side): an API the hub calls to run backup jobs in-process.

:mod:`~sendense_nbd.node.config` reads the node's TOML configuration (vCenter
credentials stay there); :mod:`~sendense_nbd.node.service` runs jobs with
:func:`sendense_nbd.backup.run_backup`; :mod:`~sendense_nbd.node.api` is the
aiohttp layer (docs/NODE_API.md).
"""
