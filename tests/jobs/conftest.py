"""Fixtures of the job tests (helpers in the job*.py modules beside this file).

The job tests reuse the helpers of the consolidation and command-line suites
(``cons_*.py``, ``cliharness.py``): their folders go on ``sys.path`` here.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent / "consolidate", HERE.parent / "cli"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
