"""vdisk: serve layered qcow2 virtual disks over NBD."""

__version__ = "0.1.0"
