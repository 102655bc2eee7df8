"""Kill -9 at seeded random moments, then resume: the cache ends identical to an uninterrupted run.

The short CI variant of ``benchmarks/kill.py`` (which runs 26 trials and prints the table)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "kill.py"


def test_killed_extractions_resume_to_the_same_cache():
    done = subprocess.run([sys.executable, str(BENCH), "--trials", "2", "--images", "24", "--seed", "3", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["n_trials"] == 2 and result["reference_rows"] == 24
    assert result["n_identical"] == 2, result["trials"]
