"""The appliance as a box: the OS image build, the installer, ``scripts/install`` and upgrades.

``layout`` and ``install`` import nothing but the standard library: they run inside the image
build's root file system and on a bare Debian box before the appliance's virtual environment
exists.
"""
