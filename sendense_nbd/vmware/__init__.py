"""vSphere access with pyvmomi, and nbdkit-vddk as the disk source.

:mod:`~sendense_nbd.vmware.session` logs in (TLS verified or pinned) and
runs pyvmomi in one worker thread; :mod:`~sendense_nbd.vmware.inventory`
finds VMs and disks; :mod:`~sendense_nbd.vmware.snapshots` and
:mod:`~sendense_nbd.vmware.cbt` take snapshots and read changed areas;
:mod:`~sendense_nbd.vmware.vddk` starts nbdkit for one disk.
"""
