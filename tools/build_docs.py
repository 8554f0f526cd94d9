"""Build the scfoundation website from the notebooks, offline, with tools installable from PyPI.

    python tools/build_docs.py            # -> _docs/index.html (open it, or serve _docs/)
    python tools/build_docs.py --quarto   # nbdev_docs instead (only where quarto is installed)

The three steps:

1. nbdev's own doc processors (those `nbdev_proc_nbs` runs, without quarto), one notebook at a
   time into `_proc/`: `#| hide` hidden, `#| export` source hidden and `show_doc` added for
   exported names, `show_doc` cells re-run so the API reference is current. One change: where
   nbdev re-runs every cell that contains an import, only the cell's imports are run (a cell
   that imports and then trains a model would otherwise retrain), and committed outputs stay.
2. The processed notebooks are turned from quarto's dialect into myst-nb's: cell options
   (`#| echo: false`, `#| output: asis`, ...) become cell tags, YAML front matter becomes the
   page title, quarto callouts become admonitions; the home page gets the chapter toctree,
   and an API index page links every `show_doc` entry. Staged in `_proc/_sphinx/`.
3. Sphinx + myst-nb render the staged notebooks (never executing them: the committed outputs
   are shown) into `_docs/`, with MathJax served from the site itself.

A manifest `_docs/_scf_pages.json` lists every page (its notebook, title, API names,
whether it has maths and an Exercises section), for tests/test_docs.py.
"""
import argparse, html, json, os, re, shutil, subprocess, sys, time, warnings
from importlib.util import find_spec
from pathlib import Path

import yaml
from docutils.nodes import make_id

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "docs"
SKIP_PARTS = ("_proc", "_docs", "_site", ".ipynb_checkpoints")

# quarto cell option -> myst-nb cell tag, for the value that hides something
HIDING_OPTIONS = {"include": "remove-cell", "echo": "remove-input", "output": "remove-output"}
# quarto callout type -> Sphinx admonition
CALLOUTS = {"note": "note", "tip": "tip", "warning": "warning", "important": "important", "caution": "caution"}
DIRECTIVE_LINE = re.compile(r"^\s*#\s*\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")
CALLOUT_OPEN = re.compile(r"^(\s*)(:{3,})\s*\{\s*\.callout-(\w+)([^}]*)\}\s*$")
TITLE_ATTR = re.compile(r"""title\s*=\s*["']([^"']*)["']""")
SHOWDOC_RULE = re.compile(r"^\s*---\s*\n")  # show_doc's leading rule: a CSS border instead
QUARTO_ATTRS = re.compile(r"\)\{(?:target|style|\.)[^}]*\}")  # [text](url){target="_blank" ...}
SHOWDOC_HEADING = re.compile(r"^#{2,4}\s+(\S+)\s*$", re.M)
MATH = re.compile(r"(?<!\\)\$|\\begin\{|\\\(|\\\[")
EXERCISES = re.compile(r"^#{1,3}\s+Exercises\b", re.M | re.I)
# show_doc's link to the code on GitHub: the repository named in settings.ini is not published
SOURCE_LINK = re.compile(r"^\s*\[source\]\([^)]*\)(\{[^}]*\})?\s*$", re.M)
# a type spelled with its defining module (anndata._core.anndata.AnnData): readers know it as AnnData
LONG_TYPE = re.compile(r"\b(?:anndata|pandas|numpy|scipy|torch|pathlib|collections|typing|scfoundation|matplotlib|safetensors)"
                       r"(?:\.\w+)*\.([A-Za-z_]\w*)\b")
NONE_TYPE_ROW = re.compile(r"^(\|[^|\n]*\|)\s*NoneType\s*\|", re.M)  # `x=None` has no type worth a column


def find_notebooks(nbs_path: Path,  # folder holding the notebooks (settings.ini's nbs_path)
                  ) -> list:  # notebook paths: index first, then in file-name order
    "Every notebook under `nbs_path` (subfolders too), skipping names nbdev skips (`_x`, `.x`)."
    found = [p for p in nbs_path.rglob("*.ipynb")
             if not any(part in SKIP_PARTS or part[0] in "._" for part in p.relative_to(nbs_path).parts)]
    return sorted(found, key=lambda p: (p.relative_to(nbs_path).as_posix() != "index.ipynb", p.relative_to(nbs_path).as_posix()))


def split_directives(source: str,  # code cell source
                    ) -> tuple:  # (options dict: name -> value string, source without directive lines)
    "Separate a cell's leading `#| name: value` lines (nbdev and quarto options) from its code."
    lines, options = source.splitlines(), {}
    while lines and (DIRECTIVE_LINE.match(lines[0]) or not lines[0].strip()):
        match = DIRECTIVE_LINE.match(lines[0])
        if match: options[match.group(1).lower()] = match.group(2).strip().strip("\"'")
        lines.pop(0)
    return options, "\n".join(lines)


def short_type_names(text: str,  # show_doc markdown or a signature
                    ) -> str:  # the same with types named as users import them
    "`anndata._core.anndata.AnnData` -> `AnnData`, `pathlib.Path` -> `Path`; `NoneType` type cells left empty."
    return NONE_TYPE_ROW.sub(r"\1  |", LONG_TYPE.sub(r"\1", text))


def tidy_showdoc(markdown: str,  # one show_doc output
                ) -> str:  # without its rule and its link to an unpublished repository, with short type names
    "What a reader of one API entry needs: the signature, the summary and the parameter table."
    return short_type_names(SOURCE_LINK.sub("", SHOWDOC_RULE.sub("", markdown))).lstrip("\n")


def tags_for(options: dict,  # cell options from `split_directives`
            ) -> list:  # myst-nb cell tags that reproduce them
    "myst-nb tags for quarto's `include`/`echo`/`output: false` (`output: asis` needs none); `code-fold: true` folds the cell."
    tags = [tag for name, tag in HIDING_OPTIONS.items() if options.get(name, "").lower() == "false"]
    # folded whole, output too: a solution's printed answer would otherwise show under its folded code
    if options.get("code-fold", "").lower() == "true" and "remove-input" not in tags: tags.append("hide-cell")
    return tags


def figure_alt(section: str,  # the heading the figure sits under
               source: str,  # the code cell that drew it
              ) -> str:  # an alt text that says what the figure is, for screen readers and broken images
    "Alt text of a figure output: its section and the call that drew it (myst-nb would name the image file's hash)."
    calls = [line.strip() for line in source.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    drawn = f", drawn by {calls[-1][:100]}" if calls else ""
    return f"Figure: {section or 'output'}{drawn}"


def convert_callouts(markdown: str,  # markdown cell source
                    ) -> str:  # the same with quarto callouts as MyST admonitions
    "Turn `::: {.callout-note title=\"T\"}` blocks into MyST `:::{note}` admonitions."
    out = []
    for line in markdown.splitlines():
        match = CALLOUT_OPEN.match(line)
        if match:
            indent, fence, kind, attrs = match.groups()
            title = TITLE_ATTR.search(attrs)
            admonition = CALLOUTS.get(kind.lower(), "note")
            if title: line = f"{indent}{fence}{{admonition}} {title.group(1)}\n{indent}:class: {admonition}"
            else: line = f"{indent}{fence}{{{admonition}}}"
        out.append(line)
    return "\n".join(out)


def parse_frontmatter(raw: str,  # a raw cell's source
                     ) -> dict:  # the YAML front matter, or {} when the cell is not front matter
    "Read quarto/nbdev front matter (`---` YAML `---`) from a raw cell."
    match = re.match(r"^\s*---\s*\n(.*?)\n\s*---\s*$", raw, re.S)
    if not match: return {}
    data = yaml.safe_load(match.group(1))
    return data if isinstance(data, dict) else {}


def title_cell(frontmatter: dict,  # front matter with `title` and maybe `description`
               fallback: str,  # title to use when the front matter has none
              ) -> dict:  # a markdown cell: `# title` and the description as the lead paragraph
    "The page heading Sphinx needs, from nbdev's front matter."
    text = f"# {frontmatter.get('title') or fallback}"
    if frontmatter.get("description"): text += f"\n\n*{frontmatter['description']}*"
    return {"cell_type": "markdown", "metadata": {}, "source": text}


def localise_links(text: str,  # markdown (a cell's source or a show_doc output)
                   site_url: str,  # the published site's address (doc_host + doc_baseurl + "/")
                  ) -> str:  # the same with links into this site made relative, quarto attributes dropped
    "nbdev links names to the published site: point them at this build's pages and anchors instead."
    def local_link(match):
        label, page, anchor = match.groups()
        code = re.fullmatch(r"`([^`]*)`", label)
        label = f'<code class="docutils literal notranslate">{html.escape(code.group(1))}</code>' if code else html.escape(label)
        return f'<a class="reference internal" href="{page}{"#" + make_id(anchor) if anchor else ""}">{label}</a>'
    text = re.sub(r"\[([^\]]*)\]\(" + re.escape(site_url) + r"([\w./-]+\.html)(?:#([\w.-]+))?\)", local_link, text)
    return QUARTO_ATTRS.sub(")", text)


def _text(value) -> str: return "".join(value) if isinstance(value, list) else (value or "")


def showdoc_names(cell: dict,  # a processed code cell
                 ) -> list:  # the documented names (`### name` headings in its markdown output)
    "Names documented by a `show_doc` cell, read from its markdown output."
    outputs = [_text(out.get("data", {}).get("text/markdown")) for out in cell.get("outputs", [])]
    return [name for text in outputs for name in SHOWDOC_HEADING.findall(text)]


def convert_code_cell(cell: dict,  # a code cell of a processed notebook (changed in place)
                     ) -> list:  # names it documents with show_doc
    "Quarto options become myst-nb tags; the directive lines leave the shown source."
    options, body = split_directives(_text(cell.get("source")))
    cell["source"] = body
    tags = cell.setdefault("metadata", {}).setdefault("tags", [])
    tags.extend(tag for tag in tags_for(options) if tag not in tags)
    if not body.strip() and "remove-input" not in tags: tags.append("remove-input")
    if options.get("output") != "asis": return []
    tags.append("scf-showdoc")
    for output in cell.get("outputs", []):
        data = output.get("data", {})
        if "text/markdown" in data: data["text/markdown"] = tidy_showdoc(_text(data["text/markdown"]))
    return showdoc_names(cell)


CELL_KEYS = {"code": ("id", "cell_type", "metadata", "source", "outputs", "execution_count"),
             "markdown": ("id", "cell_type", "metadata", "source", "attachments"),
             "raw": ("id", "cell_type", "metadata", "source", "attachments")}


def clean_cell(cell: dict,  # a cell, maybe with nbdev's extra keys (`has_sd`, `idx_`, ...)
               index: int,  # its position, for a cell id when it has none
              ) -> dict:  # a cell that nbformat validates
    "Keep the keys nbformat allows; give every cell an id."
    clean = {key: cell[key] for key in CELL_KEYS.get(cell.get("cell_type"), ()) if key in cell}
    clean.setdefault("id", f"scf-cell-{index}")
    clean.setdefault("metadata", {})
    if clean["cell_type"] == "code": clean.setdefault("outputs", []); clean.setdefault("execution_count", None)
    return clean


def convert_notebook(nb: dict,  # a notebook processed by nbdev (changed in place)
                     fallback_title: str,  # page title when it has no front matter
                     site_url: str = "",  # published address whose links become relative
                    ) -> dict:  # page facts: title, frontmatter, api names, has_math, has_exercises
    "Turn one nbdev-processed notebook into a myst-nb page."
    cells, frontmatter, api, section = [], {}, [], ""
    for cell in nb.get("cells", []):
        kind, source = cell.get("cell_type"), _text(cell.get("source"))
        headings = re.findall(r"^#{1,4}\s+(.+?)\s*$", source, re.M) if kind == "markdown" else []
        if headings: section = re.sub(r"[`*]", "", headings[-1])
        if kind == "raw" and not frontmatter and parse_frontmatter(source):
            frontmatter = parse_frontmatter(source); continue
        if kind == "markdown":
            if source.strip().startswith("<!-- WARNING: THIS FILE WAS AUTOGENERATED"): continue
            cell["source"] = convert_callouts(localise_links(source, site_url) if site_url else source)
        if kind == "code":
            api += convert_code_cell(cell)
            if any("image/png" in out.get("data", {}) for out in cell.get("outputs", [])):
                cell["metadata"].setdefault("mystnb", {})["image"] = {"alt": figure_alt(section, cell["source"])}
            for data in (out.get("data", {}) for out in cell.get("outputs", [])):
                if site_url and "text/markdown" in data: data["text/markdown"] = localise_links(_text(data["text/markdown"]), site_url)
            if not cell["source"].strip() and not cell.get("outputs"): continue
        cells.append(cell)
    title = str(frontmatter.get("title") or fallback_title)
    nb["cells"] = [clean_cell(cell, index) for index, cell in enumerate([title_cell(frontmatter, title)] + cells)]
    markdown = "\n".join(_text(c.get("source")) for c in nb["cells"] if c.get("cell_type") == "markdown")
    metadata = nb.setdefault("metadata", {})
    metadata.pop("widgets", None)
    metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    metadata.setdefault("language_info", {"name": "python"})
    return dict(title=title, frontmatter=frontmatter, api=api,
                has_math=bool(MATH.search(markdown)), has_exercises=bool(EXERCISES.search(markdown)))


def page_name(source: Path,  # notebook path relative to nbs/
              frontmatter: dict,  # its front matter (nbdev's `output-file` names the page)
             ) -> str:  # page path without suffix, as nbdev names it: 01_data.ipynb -> data
    "The page's URL stem: nbdev's `output-file` (numbers dropped), so links match nbdev's."
    output = frontmatter.get("output-file")
    stem = Path(output).stem if output else re.sub(r"^\d+[a-z]?_", "", source.stem)
    return (source.parent / stem).as_posix()


def toctree(names: list,  # page names in reading order
            caption: str = "Chapters",  # heading of the list in the sidebar
            hidden: bool = False,  # True: only in the sidebar, not listed on the page
           ) -> str:  # a MyST toctree directive
    "The toctree that puts every page in the sidebar."
    options = f":maxdepth: 1\n:caption: {caption}\n" + (":hidden:\n" if hidden else "")
    return "```{toctree}\n" + options + "\n" + "\n".join(names) + "\n```"


API_GROUPS = CONF_DIR / "api.yml"  # the user-facing names of each module; the rest are helpers


def notebook_module(notebook: Path,  # a notebook in nbs/
                   ) -> str:  # the module it exports to (`#| default_exp`), e.g. "scfoundation.data", or ""
    "The module a chapter exports, so that the API page can name its objects."
    text = notebook.read_text()
    match = re.search(r"#\|\s*default_exp\s+([\w.]+)", text)
    if not match: return ""
    return f"{read_settings(notebook.parents[1]).get('lib_path', 'scfoundation')}.{match.group(1)}"


def resolve(module: str, name: str):
    "The object `name` ('f' or 'Class.method') of `module`, or None where it cannot be imported."
    import importlib
    try: obj = importlib.import_module(module)
    except Exception: return None
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None: return None
    return obj


class _Spelled:
    "An annotation shown as written (postponed annotations are strings, which `inspect` would quote)."
    def __init__(self, text): self.text = text
    def __repr__(self): return self.text


def short_signature(obj) -> str:
    "The call signature with short type names; long or unprintable defaults shown as `...`; a class without `-> None`."
    import inspect
    try: signature = inspect.signature(obj)
    except (TypeError, ValueError): return "()"
    spell = lambda a: a if a is inspect.Parameter.empty or not isinstance(a, str) else _Spelled(a)
    parameters = []
    for parameter in signature.parameters.values():
        if parameter.name in ("self", "cls"): continue
        default = parameter.default
        if default is not inspect.Parameter.empty and (len(repr(default)) > 40 or "<" in repr(default)):
            parameter = parameter.replace(default=Ellipsis)
        parameters.append(parameter.replace(annotation=spell(parameter.annotation)))
    returns = inspect.Signature.empty if inspect.isclass(obj) else spell(signature.return_annotation)
    text = str(signature.replace(parameters=parameters, return_annotation=returns)).replace("Ellipsis", "...")
    text = re.sub(r"\b(?:ad|np|pd|sp|nn|torch\.nn)\.(?=[A-Za-z_])", "", text)  # the modules' import aliases
    return short_type_names(text)


def summary_line(obj) -> str:
    "The first line of the docstring: the one-line summary."
    import inspect
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def parameter_table(cls) -> list:
    "Markdown rows for a config dataclass: field, type, default, meaning (from the field's comment)."
    import dataclasses
    from fastcore.docments import docments
    comments = docments(cls, full=True)
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        if not field.init: continue
        info = comments.get(field.name, {})
        kind = short_type_names(getattr(field.type, "__name__", str(field.type)).replace("'", "")).replace("|", "\\|")
        default = field.default if field.default is not dataclasses.MISSING else (
            "(computed)" if field.default_factory is not dataclasses.MISSING else "")
        meaning = (info.get("docment") or "").replace("|", "\\|")
        rows.append(f"| `{field.name}` | `{kind}` | `{default!r}` | {meaning} |" if default != "" else
                    f"| `{field.name}` | `{kind}` | (required) | {meaning} |")
    return rows


def api_entry(page: dict,  # the chapter's page record (name, module)
              name: str,  # a documented name of that chapter
             ) -> list:  # MyST lines: a py-domain directive (so objects.inv lists it), its summary, a link
    "One entry of the API page: signature, one-line summary, a link to the full entry in the chapter."
    import dataclasses, inspect
    obj = resolve(page["module"], name)
    link = f'<a class="reference internal scf-api" href="{page["name"]}.html#{make_id(name)}">in the chapter</a>'
    if obj is None: return [f"- `{name}`: {link}", ""]
    if inspect.isclass(obj): kind = "class"
    elif "." in name: kind = "method"
    elif callable(obj): kind = "function"
    else: kind = "data"
    signature = "" if kind == "data" else short_signature(obj)
    lines = [f"```{{py:{kind}}} {name}{signature}", f":module: {page['module']}", ""]
    lines.append(f"{summary_line(obj)} ({link})".strip())
    if kind == "class" and dataclasses.is_dataclass(obj): lines += ["", *parameter_table(obj)]
    return lines + ["```", ""]


def api_page(pages: list,  # page records with `name`, `title`, `api` and `module`
             groups: dict = None,  # module -> user-facing names (docs/api.yml); None: read the file
            ) -> str:  # markdown for the API reference page
    "The API reference: per chapter, the user-facing names and then the helpers, each with its summary."
    if groups is None: groups = yaml.safe_load(API_GROUPS.read_text()) if API_GROUPS.exists() else {}
    lines = ["# API reference", "",
             "`import scfoundation as scf`, then `scf.data.load_pbmc68k()` and so on: one module per chapter. "
             "For each chapter, first what you call on your own data, then the helpers the chapter builds them from. "
             "Each entry links to its full documentation in the chapter: parameters, examples, tests.", ""]
    for page in pages:
        if not page["api"]: continue
        module = page.get("module", "")
        user = set(groups.get(module.rsplit(".", 1)[-1], []))
        public = [name for name in page["api"] if name in user or name.split(".")[0] in user]
        helpers = [name for name in page["api"] if name not in public]
        lines += [f"## {page['title']}", "", f"`{module}`" if module else "", ""]
        if not module:
            lines += [f'- <a class="reference internal scf-api" href="{page["name"]}.html#{make_id(name)}"><code>{name}</code></a>'
                      for name in page["api"]] + [""]
            continue
        for heading, names in (("User-facing", public), ("Helpers", helpers)):
            if not names: continue
            lines += [f"### {heading}", ""]
            for name in names: lines += api_entry(page, name)
    return "\n".join(lines)


def read_settings(root: Path = ROOT,  # project root holding settings.ini
                 ) -> dict:  # the [DEFAULT] section
    "nbdev's settings.ini as a dict."
    import configparser
    parser = configparser.ConfigParser()
    parser.read(root / "settings.ini")
    return dict(parser["DEFAULT"])


def imports_only(source: str,  # a code cell's source
                ) -> str:  # its top-level import statements (nbdev directives kept), or "" if none / unparsable
    "The part of a cell that `show_doc` can need: nbdev re-runs any cell with an import, even a training loop."
    import ast
    try: tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))
    except SyntaxError: return ""
    imports = [ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    return "\n".join(imports)


def doc_filter():
    "nbdev's notebook processors for docs, with `exec_show_docs` made safe for finished notebooks."
    from nbdev.processors import FilterDefaults, exec_show_docs, _is_showdoc

    class run_show_docs(exec_show_docs):
        "Re-run what `show_doc` needs, as nbdev does; only a failing show_doc stops the build; keep other outputs."
        def __call__(self, cell):
            is_doc, saved, source = bool(_is_showdoc(cell)), cell.get("outputs"), cell.get("source")
            if cell.get("cell_type") == "code" and not is_doc and not cell.directives_.keys() & {"export", "exports", "exporti", "exec_doc"}:
                cell["source"] = imports_only(source or "")  # nbdev would re-run the whole cell (training, plots...)
            try: super().__call__(cell)
            except Exception:
                if is_doc: raise  # the API reference itself fails: say so
                self.k.exc = None  # a helper cell: its names are not needed by show_doc
            finally: cell["source"] = source
            if saved is not None and not is_doc: cell["outputs"] = saved

    class ScfFilter(FilterDefaults):
        def base_procs(self): return [run_show_docs if proc is exec_show_docs else proc for proc in super().base_procs()]
    return ScfFilter()


def process_notebook(source: Path,  # a notebook in nbs/
                     target: Path,  # where the processed notebook goes
                    ):
    "Step 1 for one notebook: nbdev's doc processing, run from the notebook's folder as nbdev_test does."
    from execnb.nbio import read_nb, write_nb
    notebook, here = read_nb(source), Path.cwd()
    os.chdir(source.parent)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            doc_filter()(notebook)
    finally: os.chdir(here)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_nb(notebook, target)


def process_notebooks(notebooks: list,  # notebooks found in nbs/
                      nbs_path: Path,  # the notebooks folder
                      proc: Path,  # output folder (`_proc/`)
                     ):
    "Step 1: process every notebook; stop with the list of those nbdev could not process."
    failures, previous = [], os.environ.get("IN_TEST")
    os.environ["IN_TEST"] = "1"  # as nbdev's own doc processing sets it
    for notebook in notebooks:
        try: process_notebook(notebook, proc / notebook.relative_to(nbs_path))
        except Exception as error:
            failures.append(f"{notebook.relative_to(nbs_path.parent)}: {error} ({error.__cause__ or ''})")
    if previous is None: del os.environ["IN_TEST"]
    else: os.environ["IN_TEST"] = previous
    if failures:
        sys.exit("nbdev could not document these notebooks (a show_doc cell fails when re-run):\n"
                 + "\n".join(failures) + "\nFix the cell (run the notebook top to bottom), then build again.")


def copy_mathjax(static: Path,  # the staged `_static` folder
                ) -> Path:  # the copied MathJax file
    "Put MathJax 3 (from the PyPI package django-static-mathjax) among the site's static files."
    spec = find_spec("mathjax")
    source = Path(spec.origin).parent / "static" / "mathjax" / "es5" / "tex-svg.js" if spec and spec.origin else None
    if source is None or not source.exists():
        sys.exit("MathJax not found: install the docs tools with `pip install -e '.[dev]'` (needs django-static-mathjax)")
    target = static / "mathjax" / "tex-svg.js"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
    return target


def site_url(settings: dict,  # settings.ini
            ) -> str:  # where nbdev would publish the site, e.g. https://org.github.io/repo/
    "The published site's address, as nbdev writes it into doc links."
    return settings.get("doc_host", "").rstrip("/") + "/" + settings.get("doc_baseurl", "").strip("/") + "/"


def stage_pages(notebooks: list,  # notebooks found in nbs/
                nbs_path: Path,  # the notebooks folder
                proc: Path,  # nbdev's `_proc/` folder
                stage: Path,  # Sphinx's source folder, rebuilt here
                url: str = "",  # published address whose links become relative
               ) -> list:  # page records, home page first
    "Step 2: convert each processed notebook into a myst-nb page under `stage`."
    pages = []
    for notebook in notebooks:
        relative = notebook.relative_to(nbs_path)
        processed = json.loads((proc / relative).read_text())
        facts = convert_notebook(processed, fallback_title=relative.stem, site_url=url)
        name = "index" if relative.as_posix() == "index.ipynb" else page_name(relative, facts["frontmatter"])
        if any(page["name"] == name for page in pages): name = relative.with_suffix("").as_posix()
        target = stage / f"{name}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(processed, indent=1))
        facts.pop("frontmatter")
        pages.append(dict(name=name, source=f"{nbs_path.name}/{relative.as_posix()}", module=notebook_module(notebook), **facts))
    return pages


def copy_assets(nbs_path: Path,  # the notebooks folder
                stage: Path,  # Sphinx's source folder
               ):
    "Images and other files beside the notebooks, so that markdown links to them resolve."
    for path in nbs_path.rglob("*"):
        relative = path.relative_to(nbs_path)
        if path.is_dir() or path.suffix in (".ipynb", ".yml", ".py") or any(part[0] in "._" for part in relative.parts): continue
        (stage / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, stage / relative)


def syllabus_page() -> str:
    "The syllabus (tools/syllabus.py, the same text as the README's section) as a page of its own."
    import importlib.util
    spec = importlib.util.spec_from_file_location("scf_syllabus", ROOT / "tools" / "syllabus.py")
    syllabus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(syllabus)
    return syllabus.render(ROOT).replace("## Syllabus", "# Syllabus", 1)


def write_home_and_api(pages: list,  # page records from `stage_pages`
                       stage: Path,  # Sphinx's source folder
                       settings: dict,  # settings.ini
                      ) -> list:  # page records, with the generated ones added
    "The home page carries the toctree (the sidebar); install and syllabus pages first; an API page when anything is documented."
    chapters = [page["name"] for page in pages if page["name"] != "index"]
    front = []
    if (CONF_DIR / "install.md").exists():
        shutil.copy(CONF_DIR / "install.md", stage / "install.md")
        front.append(dict(name="install", source=None, title="Install", api=[], has_math=False, has_exercises=False))
    if (CONF_DIR / "syllabus.yml").exists():
        (stage / "syllabus.md").write_text(syllabus_page())
        front.append(dict(name="syllabus", source=None, title="Syllabus", api=[], has_math=False, has_exercises=False))
    chapters = [page["name"] for page in front] + chapters
    pages = pages[:1] + front + pages[1:] if pages and pages[0]["name"] == "index" else front + pages
    if any(page["api"] for page in pages):
        (stage / "api.md").write_text(api_page(pages))
        chapters.append("api")
        pages.append(dict(name="api", source=None, title="API reference", api=[], has_math=False, has_exercises=False))
    home = stage / "index.ipynb"
    if home.exists():
        nb = json.loads(home.read_text())
        nb["cells"].append({"id": "scf-toctree", "cell_type": "markdown", "metadata": {}, "source": toctree(chapters)})
        home.write_text(json.dumps(nb, indent=1))
    else:
        (stage / "index.md").write_text(f"# {settings['title']}\n\n{settings['description']}\n\n{toctree(chapters)}\n")
        pages.insert(0, dict(name="index", source=None, title=settings["title"], api=[], has_math=False, has_exercises=False))
    return pages


def run_sphinx(stage: Path,  # Sphinx's source folder
               out: Path,  # the site folder
               doctrees: Path,  # Sphinx's cache
               strict: bool = False,  # True: warnings fail the build
              ):
    "Step 3: render the staged pages with Sphinx + myst-nb (no execution) into `out`."
    command = [sys.executable, "-m", "sphinx", "-b", "html", "-c", str(CONF_DIR), "-d", str(doctrees),
               "-q", "-E", "-j", "1", "-D", f"html_static_path={CONF_DIR / '_static'},{stage / '_static'}",
               str(stage), str(out)] + (["-W", "--keep-going"] if strict else [])
    result = subprocess.run(command, cwd=ROOT)
    if result.returncode: sys.exit(f"sphinx-build failed (exit {result.returncode}): see the messages above")


def stage_sources(root: Path = ROOT,  # project root
                 ) -> tuple:  # (stage folder, page records)
    "Steps 1 and 2: process the notebooks and stage Sphinx's sources; returns the page records."
    settings = read_settings(root)
    nbs_path = root / settings.get("nbs_path", "nbs")
    notebooks = find_notebooks(nbs_path)
    if not notebooks: sys.exit(f"no notebooks in {nbs_path}: nothing to build")
    proc = root / "_proc"
    if proc.exists(): shutil.rmtree(proc)
    process_notebooks(notebooks, nbs_path, proc)
    stage = proc / "_sphinx"
    copy_mathjax(stage / "_static")
    copy_assets(nbs_path, stage)
    pages = stage_pages(notebooks, nbs_path, proc, stage, site_url(settings))
    return stage, write_home_and_api(pages, stage, settings)


def build_site(root: Path = ROOT,  # project root
               out: Path = None,  # site folder (default: settings.ini's doc_path, `_docs`)
               strict: bool = False,  # True: Sphinx warnings fail the build
              ) -> Path:  # the site folder
    "Build the whole website: nbdev processing, myst-nb staging, Sphinx; write the page manifest."
    out = Path(out or root / read_settings(root).get("doc_path", "_docs"))
    stage, pages = stage_sources(root)
    if out.exists(): shutil.rmtree(out)
    html = stage.parent / "_site" / "html"  # myst-nb writes images to html/../jupyter_execute: keep it in _proc
    run_sphinx(stage, html, stage.parent / "_doctrees", strict)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(html), str(out))
    (out / "_scf_pages.json").write_text(json.dumps(pages, indent=1))
    (out / ".nojekyll").touch()
    return out


def build_with_quarto():
    "Where quarto is installed, nbdev's own `nbdev_docs` still builds the site."
    if not shutil.which("quarto"): sys.exit("quarto is not installed: run `python tools/build_docs.py` without --quarto")
    subprocess.run(["nbdev_docs"], cwd=ROOT, check=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="site folder (default: _docs)")
    parser.add_argument("--strict", action="store_true", help="fail on Sphinx warnings")
    parser.add_argument("--quarto", action="store_true", help="use nbdev_docs (needs quarto) instead")
    args = parser.parse_args(argv)
    if args.quarto: return build_with_quarto()
    start = time.time()
    out = build_site(out=args.out, strict=args.strict)
    pages = json.loads((out / "_scf_pages.json").read_text())
    print(f"built {len(pages)} pages into {out} in {time.time() - start:.1f}s; open {out / 'index.html'}")


if __name__ == "__main__":
    main()
