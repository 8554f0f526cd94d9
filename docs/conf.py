"""Sphinx configuration for the scfoundation website, built offline by `python tools/build_docs.py`.

The sources Sphinx reads are not the notebooks in nbs/ but their processed copies (nbdev's own
doc processing, then quarto options turned into myst-nb cell tags), staged by the build script.
Everything the pages load is served from the site itself: no CDN, so the site works offline.
"""
import configparser
from pathlib import Path

_settings = configparser.ConfigParser()
_settings.read(Path(__file__).resolve().parents[1] / "settings.ini")
_cfg = _settings["DEFAULT"]

project = _cfg["title"]
author = _cfg["author"]
copyright = _cfg["copyright"]
release = version = _cfg["version"]

extensions = ["myst_nb", "sphinx.ext.mathjax"]
root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# The notebooks are committed with their outputs: render what is there, never execute.
nb_execution_mode = "off"
nb_merge_streams = True
nb_render_markdown_format = "myst"  # show_doc tables are MyST tables
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_dmath_double_inline = True
# show_doc output starts at `###` under a `#` page title: expected, not a mistake.
suppress_warnings = ["myst.header"]

# MathJax 3 from the PyPI package django-static-mathjax, copied into _static by the build
# script (a single self-contained file: SVG output needs no web fonts).
mathjax_path = "mathjax/tex-svg.js"
mathjax3_config = {"svg": {"fontCache": "global"}}

html_theme = "furo"
html_title = project
html_static_path = ["_static"]  # tools/build_docs.py adds the staged folder holding MathJax
html_favicon = "_static/favicon.svg"
html_css_files = ["scf.css"]
html_theme_options = {"navigation_with_keys": True}
html_show_sourcelink = False
html_copy_source = False
html_last_updated_fmt = None
