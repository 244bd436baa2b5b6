"""Figures the fault tests leave for ``benchmarks/reliability.py``: with SARJEPA_RELIABILITY_FIGURES
set to a file, a fault test that passed appends one JSON line (fault, final step, steps lost,
recovery seconds...) to it; otherwise nothing is written."""

from __future__ import annotations

import json
import os
from typing import Any

FIGURES_ENV = "SARJEPA_RELIABILITY_FIGURES"


def record_figure(fault: str, **figures: Any) -> None:
    path = os.environ.get(FIGURES_ENV)
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"fault": fault, "survived": True, **figures}) + "\n")
