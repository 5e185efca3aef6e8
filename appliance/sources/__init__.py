"""Sources that are not paths on the appliance: hosts with the backup client, hosts pulled over
SSH/SFTP, and the SSH identity they share (libvirt hosts live in ``image.libvirt``)."""
