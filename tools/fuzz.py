"""Run the property-based fuzz suite (tests/test_fuzz.py) with many random examples.

CI runs a bounded, derandomized profile; this draws fresh random graphs each time.

Usage:  python tools/fuzz.py [--examples 2000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1000)
    args = parser.parse_args()
    env = {**os.environ, "HYPOTHESIS_PROFILE": "thorough", "FUZZ_EXAMPLES": str(args.examples)}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-p",
        "no:warnings",
        "--hypothesis-show-statistics",
        str(ROOT / "tests" / "test_fuzz.py"),
    ]
    sys.exit(subprocess.run(command, env=env, cwd=ROOT).returncode)


if __name__ == "__main__":
    main()
