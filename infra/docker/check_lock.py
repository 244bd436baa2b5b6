"""Fail unless every package pinned in the lock is installed at exactly its pinned version.

Usage: python check_lock.py infra/constraints.txt (the image build runs it after installing).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata


def pins(lock_text: str) -> dict[str, str]:
    found = {}
    for line in lock_text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return found


def mismatches(lock_text: str) -> list[str]:
    problems = []
    for name, want in sorted(pins(lock_text).items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: not installed (lock: {want})")
            continue
        # a local build tag (torch 2.14.1+cu130) is the same release as the lock's 2.14.1
        if have.split("+", 1)[0] != want:
            problems.append(f"{name}: {have} installed, lock: {want}")
    return problems


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        problems = mismatches(fh.read())
    for problem in problems:
        print(f"check_lock: {problem}", file=sys.stderr)
    sys.exit(1 if problems else 0)
