"""Everything that runs QEMU tools: the disk-format plug-in and failover.

- ``disk_source``/``qemu_img``/``nbd_client``: VM images in qcow2, vmdk, ... read for backups;
- ``nbd_export``: a point's disk served read-only over NBD straight from the store;
- ``qemu``/``qmp``/``boot_proof``/``failover``: booting a point, proving it, migrating off the
  backup and failing back (see docs/failover.md);
- ``testguest``: the bootable busybox test guest built from Debian packages.
"""
