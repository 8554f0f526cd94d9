"""Is the environment on its pins? fastcore, nbdev and execnb against their `name==version` lines in
constraints.txt, and (in the .venv that tools/setup.sh makes) whether pip's config names constraints.txt.

    python tools/check_env.py     # silent and exit 0 when all is well, else one line and exit 1

tools/test.sh runs it first: nbdev 2.4.14 runs only with fastcore 1.8, and a `pip install` that
upgraded fastcore breaks every notebook's export and the docs build (`name 'Param' is not defined`).
"""
import re, subprocess, sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
CHECKED = ("fastcore", "nbdev", "execnb")  # the ones nbdev_export, nbdev_test and the docs build need as pinned
PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)")


def pins(path: Path = CONSTRAINTS,  # a pip constraints file
        ) -> dict:  # package name -> pinned version, for each `name==version` line
    "The exact pins of a constraints file."
    return {m.group(1).lower(): m.group(2) for line in path.read_text().splitlines() if (m := PIN.match(line))}


def installed(name: str) -> str | None:
    "The installed version without its local label (`2.13.0+cpu` -> `2.13.0`), or None."
    try: return version(name).split("+")[0]
    except PackageNotFoundError: return None


def off_pins(pinned: dict = None,  # name -> version; default: constraints.txt's
             names=CHECKED,  # the packages to check
            ) -> list:  # `name installed (pinned want)` for each that differs
    "The checked packages whose installed version is not their pin."
    pinned = pins() if pinned is None else pinned
    return [f"{name} {installed(name) or 'not installed'} (pinned {pinned[name]})"
            for name in names if installed(name) != pinned[name]]


def in_setup_venv() -> bool:
    "Running in the .venv that tools/setup.sh makes beside this repository?"
    return sys.prefix != sys.base_prefix and Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()


def pip_constraints() -> list:
    "The constraint files pip's own configuration gives `pip install` here (config files and PIP_CONSTRAINT)."
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    files = {}
    for line in out.splitlines():  # lines like  install.constraint='/path/constraints.txt'
        key, _, value = line.partition("=")
        if key.split(".")[-1] == "constraint": files[key.split(".")[0]] = value.strip("'\"").split()
    # pip applies the most specific section: the environment, then [install], then [global]
    for section in (":env:", "install", "global"):
        if section in files: return files[section]
    return []


def main():
    pinned = pins()
    problems = off_pins(pinned)
    if problems:
        quick = " ".join(f"{p.split()[0]}=={pinned[p.split()[0]]}" for p in problems)
        sys.exit(f"FAIL: environment off its pins in constraints.txt: {'; '.join(problems)}. "
                 f"Run: bash tools/setup.sh   (quicker: pip install --no-deps -c constraints.txt {quick})")
    if in_setup_venv() and str(CONSTRAINTS) not in [str(Path(f).resolve()) for f in pip_constraints()]:
        sys.exit(f"FAIL: .venv's pip config does not name {CONSTRAINTS}, so the next pip install may upgrade "
                 f"fastcore past what nbdev 2 runs with. Run: bash tools/setup.sh")


if __name__ == "__main__":
    main()
