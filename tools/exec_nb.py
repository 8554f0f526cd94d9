"""Execute notebooks in place so that their saved outputs (tables, figures) are current, then
clean them. Used by authors before committing; CI re-runs every notebook with nbdev_test.

    python tools/exec_nb.py nbs/01_data.ipynb [more.ipynb ...]
"""
import os, subprocess, sys, time
from pathlib import Path

from execnb.shell import CaptureShell


def main(paths):
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")  # as tools/test.sh: numba's OpenMP threads slow PyTorch down
    for p in map(Path, paths):
        start = time.time()
        cwd = Path.cwd()
        os.chdir(p.parent)
        try:
            CaptureShell(p.name).execute(p.name, p.name, exc_stop=True)
        finally:
            os.chdir(cwd)
        print(f"executed {p} in {time.time() - start:.1f}s", flush=True)
        subprocess.run(["nbdev_clean", "--fname", str(p)], check=True)


if __name__ == "__main__":
    main(sys.argv[1:])
