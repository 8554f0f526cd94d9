"""Write README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which cannot be installed
offline). Markdown cells are copied; code cells become ```python blocks followed by their text
output; cells with `#| hide` are left out; the `> summary` line of the title cell is kept.

    python tools/make_readme.py            # write README.md
    python tools/make_readme.py --check    # exit 1 if README.md is out of date
"""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BANNER = "<!-- WARNING: generated from nbs/index.ipynb by tools/make_readme.py; edit the notebook, not this file. -->\n\n"


def _code_cell(cell) -> str:
    lines = cell["source"].splitlines() if isinstance(cell["source"], str) else "".join(cell["source"]).splitlines()
    if any(l.strip().startswith("#| hide") for l in lines): return ""
    code = "\n".join(l for l in lines if not l.startswith("#|")).strip()
    text = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream": text.append("".join(out["text"]))
        elif "text/plain" in out.get("data", {}): text.append("".join(out["data"]["text/plain"]))
    block = f"```python\n{code}\n```\n"
    if text: block += "\n```\n" + "".join(text).rstrip() + "\n```\n"
    return block


def render() -> str:
    nb = json.loads((ROOT / "nbs" / "index.ipynb").read_text())
    parts = []
    for cell in nb["cells"]:
        src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        parts.append(src.strip() + "\n" if cell["cell_type"] == "markdown" else _code_cell(cell))
    return BANNER + "\n".join(p for p in parts if p)


if __name__ == "__main__":
    text, readme = render(), ROOT / "README.md"
    if "--check" in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            print("README.md is out of date: run python tools/make_readme.py"); sys.exit(1)
    else:
        readme.write_text(text); print("wrote README.md")
