"""Make the block engine (``plugin/vdisk_block``) importable from the orchestration.

The engine is standard-library-only code that lives beside the nbdkit entry
script, not in the ``vdisk`` package; this is the one place that puts
``<repo>/plugin`` on ``sys.path``. Import this module before ``vdisk_block``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO_ROOT / "plugin"

if str(PLUGIN_DIR) not in sys.path:
    sys.path.insert(0, str(PLUGIN_DIR))
