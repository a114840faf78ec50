"""Make the flat repo's modules importable from tests/ and keep tests single-threaded-fast."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
