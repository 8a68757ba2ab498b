"""Run every benchmark under bench/ in turn (``make bench``); each prints its own table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["core.py", "fetch.py", "excel_import.py", "database_import.py"]


def main() -> int:
    failures = 0
    for name in ORDER:
        script = HERE / name
        if not script.exists():
            continue
        print(f"\n## {name}\n", flush=True)
        failures += subprocess.run([sys.executable, str(script), *sys.argv[1:]]).returncode != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
