"""How long the ``headstart`` command takes as a whole process: start-up, help, and a warm ``train``.

usage:
    python benchmarks/startup.py [DATA] [--repeats 5] [--cli COMMAND] [--inherit-env]

DATA defaults to ../shared/data/ants_bees_train (beside this repository); without it the train rows
are skipped. Every row is a separate process timed wall-clock from outside (interpreter start-up and
imports included). The rows are run round-robin, ``--repeats`` times each, and the table shows the
median, so that a machine whose speed drifts during the run slows every row alike; ``cpu s`` is the
median user + system CPU time of the process, which contention from other processes inflates less
than wall-clock. Only ratios within one run are meaningful: the machine's speed varies between days.

Rows:
  python -c pass            the interpreter alone
  import torch, sklearn     ``python -c "import torch, sklearn"``: the reference the train target is set against
  headstart --version       the console script beside this Python (else ``python -m headstart``; or ``--cli``)
  headstart --help          the top-level help
  headstart backbones --help  a subcommand's help
  warm train --select none  ``headstart train DATA --out RUN --select none --weight-decay 0.01``, features cached
  warm train (selection)    ``headstart train DATA --out RUN`` (the default head selection), features cached

The feature cache is a temporary folder, filled by one ``headstart train`` (default selection, so the
backbone's classifier is cached too) before timing; each timed train writes a new run folder.

Bytecode: an installed package has its ``.pyc`` files, but a checkout run with PYTHONDONTWRITEBYTECODE=1
compiles every headstart module on every start (about 0.1-0.3 s). By default the processes therefore get
a bytecode cache of their own (PYTHONPYCACHEPREFIX in the temporary folder, filled by the untimed warm-up
runs, which compile torch and scikit-learn into it once); ``--inherit-env`` times the environment as it is.

Targets (issue 12): --version, --help and backbones --help <= 0.5 s; a warm train <= 1.5x the reference.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HELP_TARGET_S = 0.5
TRAIN_TARGET_RATIO = 1.5


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall-clock and CPU seconds (user + system) of one process; exits if it fails."""
    before = os.times()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    after = os.times()
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return wall, cpu


def headstart_command(cli: str | None) -> list[str]:
    """The console script as a user runs it: ``--cli``, the one installed beside this Python, or ``-m``."""
    if cli:
        return shlex.split(cli)
    beside = Path(sys.executable).with_name("headstart")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("headstart")
    return [found] if found else [sys.executable, "-m", "headstart"]


def build_rows(hs: list[str], data: Path | None, tmp: str) -> list[tuple[str, list[str]]]:
    py = sys.executable
    rows = [
        ("python -c pass", [py, "-c", "pass"]),
        ("import torch, sklearn", [py, "-c", "import torch, sklearn"]),
        ("headstart --version", [*hs, "--version"]),
        ("headstart --help", [*hs, "--help"]),
        ("headstart backbones --help", [*hs, "backbones", "--help"]),
    ]
    if data is not None:
        train = [*hs, "train", str(data), "--cache-dir", f"{tmp}/cache"]
        rows += [("warm train --select none", [*train, "--select", "none", "--weight-decay", "0.01"]),
                 ("warm train (selection)", train)]
    return rows


def child_env(tmp: str, inherit: bool) -> dict[str, str]:
    """The environment of the timed processes: with a bytecode cache of their own unless ``inherit``."""
    env = dict(os.environ)
    if not inherit:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = f"{tmp}/pycache"
    return env


def measure(rows: list[tuple[str, list[str]]], repeats: int, tmp: str,
            env: dict[str, str]) -> dict[str, list[tuple[float, float]]]:
    """Each row ``repeats`` times, round-robin; a train row gets a new ``--out`` folder every time."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in rows}
    for r in range(repeats):
        for i, (name, cmd) in enumerate(rows):
            if "train" in cmd:
                cmd = [*cmd, "--out", f"{tmp}/run_{i}_{r}"]
            times[name].append(timed(cmd, env))
    return times


def warm_up(rows: list[tuple[str, list[str]]], tmp: str, env: dict[str, str]) -> None:
    """Untimed: the reference and --help (bytecode), and the default train (features, classifier, bytecode)."""
    for name, cmd in rows:
        if name in ("import torch, sklearn", "headstart --help", "warm train (selection)"):
            timed([*cmd, "--out", f"{tmp}/warmup"] if "train" in cmd else cmd, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default=str(SHARED / "data" / "ants_bees_train"))
    parser.add_argument("--repeats", type=int, default=5, help="runs per row (median reported)")
    parser.add_argument("--cli", default=None,
                        help="the headstart command to time, e.g. 'python -m headstart' (run in this checkout)")
    parser.add_argument("--inherit-env", action="store_true",
                        help="no bytecode cache of their own: the processes get this environment as it is")
    args = parser.parse_args()
    hs = headstart_command(args.cli)
    data: Path | None = Path(args.data)
    if not data.is_dir():
        print(f"no data folder '{data}' (../shared absent?): skipping the train rows")
        data = None
    with tempfile.TemporaryDirectory() as tmp:
        rows = build_rows(hs, data, tmp)
        env = child_env(tmp, args.inherit_env)
        warm_up(rows, tmp, env)
        times = measure(rows, args.repeats, tmp, env)
    wall = {name: statistics.median(w for w, _ in t) for name, t in times.items()}
    cpu = {name: statistics.median(c for _, c in t) for name, t in times.items()}
    ref, cpu_ref = wall["import torch, sklearn"], cpu["import torch, sklearn"]
    bytecode = "as inherited" if args.inherit_env else "cached (own PYTHONPYCACHEPREFIX)"
    print(f"headstart: {' '.join(hs)}; data: {data or '-'}; bytecode: {bytecode}; "
          f"median of {args.repeats} runs per row, round-robin")
    header = f"{'':28} {'wall s':>7} {'min s':>7} {'cpu s':>7} {'wall/ref':>8} {'cpu/ref':>7}  target"
    print(header)
    print("-" * len(header))
    for name, t in times.items():
        if name.startswith("headstart"):
            verdict = f"<= {HELP_TARGET_S} s: {'met' if wall[name] <= HELP_TARGET_S else 'MISSED'}"
        elif name.startswith("warm train"):
            ok = wall[name] / ref <= TRAIN_TARGET_RATIO
            verdict = f"<= {TRAIN_TARGET_RATIO}x reference: {'met' if ok else 'MISSED'}"
        else:
            verdict = "reference" if name == "import torch, sklearn" else ""
        print(f"{name:28} {wall[name]:7.2f} {min(w for w, _ in t):7.2f} {cpu[name]:7.2f} "
              f"{wall[name] / ref:7.2f}x {cpu[name] / cpu_ref:6.2f}x  {verdict}")


if __name__ == "__main__":
    main()
