import sys
from pathlib import Path

WORKLOADS = Path(__file__).resolve().parents[2] / "bench" / "workloads"
if str(WORKLOADS) not in sys.path:
    sys.path.insert(0, str(WORKLOADS))
