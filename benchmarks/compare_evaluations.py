"""Compare two ``evaluation.json`` files key by key: the old argparse ``trustcnn.evaluate`` against the Hydra app.

    python benchmarks/compare_evaluations.py OLD.json NEW.json [OLD.json NEW.json ...]

Every number is compared under its key path with the model's name left out (``models.<name>.accuracy.ci_low`` →
``accuracy.ci_low``); the table gives the largest absolute difference per key over models and files, and lists
keys that only one side has and non-numeric values that differ (paths such as ``out_dir`` excepted). Exit
status 1 when a key is missing on one side or a difference exceeds ``--tolerance`` (default 1e-6).

How the numbers in the issue-12 note were made (tiny decoy-digit runs of tests/tiny_sweep.py, old code from the
commit before the Hydra app, ``git archive`` into /tmp/oldrepo): see the report's commands in the commit message.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator


def leaves(obj: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, (*path, str(k)))
    elif isinstance(obj, list) and not all(isinstance(v, (int, float)) for v in obj):
        for i, v in enumerate(obj):
            yield from leaves(v, (*path, str(i)))
    else:
        yield path, obj


def generic(path: tuple[str, ...], models: set[str]) -> str:
    return ".".join(p for i, p in enumerate(path) if not (i == 1 and path[0] == "models" and p in models)
                    and not (path[0] == "models" and i == 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="pairs OLD.json NEW.json")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args(argv)
    if len(args.files) % 2:
        parser.error("give the files in pairs: OLD.json NEW.json")
    worst: dict[str, float] = {}
    problems: list[str] = []
    for old_file, new_file in zip(args.files[::2], args.files[1::2]):
        old, new = json.loads(old_file.read_text()), json.loads(new_file.read_text())
        models = set(old.get("models", {})) | set(new.get("models", {}))
        a, b = dict(leaves(old)), dict(leaves(new))
        for path in sorted(set(a) ^ set(b)):
            problems.append(f"{new_file}: {'.'.join(path)} only in {'old' if path in a else 'new'}")
        for path in sorted(set(a) & set(b)):
            key, x, y = generic(path, models), a[path], b[path]
            if path[-1] in ("run_dir", "checkpoint"):
                continue
            if isinstance(x, bool) or isinstance(y, bool) or not isinstance(x, (int, float, type(None))) \
                    or not isinstance(y, (int, float, type(None))):
                if x != y:
                    problems.append(f"{new_file}: {'.'.join(path)}: {x!r} vs {y!r}")
                worst.setdefault(key, 0.0)
                continue
            if x is None or y is None:
                diff = 0.0 if x is None and y is None else math.inf
            else:
                diff = abs(float(x) - float(y))
            worst[key] = max(worst.get(key, 0.0), diff)
    width = max(map(len, worst), default=3)
    print(f"{'key':<{width}}  max |old - new|")
    for key, diff in worst.items():
        print(f"{key:<{width}}  {diff:.3g}")
    too_far = [k for k, d in worst.items() if d > args.tolerance]
    for p in problems:
        print("DIFFERS:", p)
    for k in too_far:
        print(f"OVER TOLERANCE: {k} ({worst[k]:.3g} > {args.tolerance})")
    return 1 if problems or too_far else 0


if __name__ == "__main__":
    sys.exit(main())
