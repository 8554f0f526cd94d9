"""Run every notebook the way `nbdev_test` does (same function, same skip flags), one after
another, and print a budget table: seconds per notebook. Exit 1 if any notebook fails.

    python tools/time_notebooks.py                 # all of nbs/
    python tools/time_notebooks.py nbs/01_data.ipynb
"""
import sys, time
from pathlib import Path

from nbdev.config import get_config
from nbdev.test import test_nb


def main(paths):
    cfg = get_config()
    notebooks = [Path(p) for p in paths] or sorted(Path(cfg.nbs_path).glob("[0-9]*.ipynb")) + [Path(cfg.nbs_path) / "index.ipynb"]
    skip = cfg.tst_flags.split()
    rows, failed, start = [], [], time.time()
    for nb in notebooks:
        ok, seconds = test_nb(nb.resolve(), skip_flags=skip)
        rows.append((nb.name, seconds, "ok" if ok else "FAILED"))
        print(f"{nb.name:<32} {seconds:7.1f} s  {'ok' if ok else 'FAILED'}", flush=True)
        if not ok: failed.append(nb.name)
    print(f"{'total':<32} {time.time() - start:7.1f} s  ({len(notebooks)} notebooks, skipped flags: {skip})")
    if failed:
        print("FAILED notebooks:", ", ".join(failed)); sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
