"""Run every notebook the way `nbdev_test` does (same function, same skip flags), one after
another, and print a budget table: seconds per notebook. Exit 1 if any notebook fails.

    python tools/time_notebooks.py                 # all of nbs/
    python tools/time_notebooks.py nbs/01_data.ipynb
    python tools/time_notebooks.py --record docs/notebook_times.json   # all of nbs/, times saved for the syllabus

`--record` writes the seconds with the machine they were measured on (processor, cores, bf16
support, date): the syllabus (tools/syllabus.py) shows them. Record on an otherwise idle machine.
"""
import datetime, json, os, platform, sys, time
from pathlib import Path

from nbdev.config import get_config
from nbdev.test import test_nb


def machine() -> dict:
    "Where the times were measured: processor model, cores, and whether bf16 matrix units exist."
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    import torch
    return dict(processor=model, cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                bf16_matrix_units=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), torch=torch.__version__,
                date=datetime.date.today().isoformat())


def record(rows: list, path: Path):
    "Save the seconds per notebook, and the machine, as JSON."
    data = dict(command="python tools/time_notebooks.py --record " + str(path), machine=machine(),
                seconds={name: round(seconds, 1) for name, seconds, status in rows if status == "ok"})
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"recorded {len(data['seconds'])} notebooks in {path}")


def main(paths, record_to=None):
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
    if record_to: record(rows, Path(record_to))


if __name__ == "__main__":
    args = sys.argv[1:]
    target = args.pop(args.index("--record") + 1) if "--record" in args else None
    main([a for a in args if a != "--record"], record_to=target)
