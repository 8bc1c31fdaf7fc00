"""Refresh tests/durations.json, the seconds each test module took in a run, from which
tests/conftest.py orders the modules for pytest-xdist (heaviest first):

    python -m pytest -n 2 --dist loadscope --durations=0 | tee run.log
    python tests/durations.py run.log

Only the order matters, so a run on a loaded machine serves as well as an idle one."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

LINE = re.compile(r"^([0-9.]+)s (?:setup|call|teardown)\s+(tests/\S+?\.py)::")


def main(log: str) -> None:
    seconds: dict[str, float] = {}
    for line in Path(log).read_text().splitlines():
        if m := LINE.match(line):
            seconds[m.group(2)] = seconds.get(m.group(2), 0) + float(m.group(1))
    out = Path(__file__).with_name("durations.json")
    out.write_text(json.dumps({k: round(v) for k, v in sorted(seconds.items())}, indent=1)
                   + "\n")
    print(f"{out}: {len(seconds)} modules")


if __name__ == "__main__":
    main(sys.argv[1])
