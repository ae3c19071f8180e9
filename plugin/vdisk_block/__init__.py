"""vdisk block driver: qcow2 chains read and written in pure Python.

Used by the nbdkit entry script (plugin/vdisk_nbdkit.py); importable without
nbdkit so that tests drive it directly.
"""

from .chain import open_chain, open_disk
from .disk import Disk
from .errors import ImageError

__version__ = "0.1.0"
__all__ = ["Disk", "ImageError", "__version__", "open_chain", "open_disk"]
