"""The book in JupyterLab, as a student opens it: `scf book`'s command, a chapter run in the browser.

    python -m pytest tests/test_book.py -q

Starts JupyterLab headless on a free port of 127.0.0.1 (the command `scf book` runs), opens a copy
of one chapter in Debian's Chromium through Playwright, runs all its cells, and checks that every
code cell ran, none shows an error and a figure appears; then stops the server. The copy lives in
a temporary folder (with settings.ini beside it, for the chapter's closing `nbdev_export`), so the
repository's notebooks are never touched. Skipped without Chromium (fails with SCF_REQUIRE_BROWSER=1).
"""
import json, os, secrets, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

from scfoundation.cli import book_command, main
from test_docs import CHROMIUM_FLAGS, browser_or_skip

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = "03_tokenize.ipynb"   # a few seconds to run, with figures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def test_book_command_names_jupyterlab_and_the_notebooks(tmp_path):
    command = book_command(port=9999, open_browser=False)
    assert command[:3] == [sys.executable, "-m", "jupyterlab"]
    assert f"--ServerApp.root_dir={ROOT / 'nbs'}" in command and "--no-browser" in command
    assert main(["book", str(tmp_path)]) == 2      # no notebooks there: a one-line error


def wait_for_server(url: str, process, seconds: float = 90):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None: raise RuntimeError(f"JupyterLab exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2): return
        except OSError: time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer at {url} within {seconds}s")


@pytest.fixture
def jupyterlab(tmp_path):
    "JupyterLab on a copy of one chapter, its settings, workspaces and runtime files in tmp_path."
    browser_or_skip()
    book = tmp_path / "book"
    (book / "nbs").mkdir(parents=True)
    shutil.copy(ROOT / "settings.ini", book)
    shutil.copy(ROOT / "nbs" / CHAPTER, book / "nbs")
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "docmanager-extension"
    settings.mkdir(parents=True)
    (settings / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    # every cell in the page (JupyterLab 4 renders only the cells in view by default), so figures can be counted
    notebook_settings = tmp_path / "lab-settings" / "@jupyterlab" / "notebook-extension"
    notebook_settings.mkdir(parents=True)
    (notebook_settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "lab-settings"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    env.pop("MPLBACKEND", None)   # as on a student's machine: the kernel's inline figures, not Agg (tools/test.sh sets it)
    port, token = free_port(), secrets.token_hex(16)
    command = book_command(book / "nbs", port=port, open_browser=False) + [
        f"--IdentityProvider.token={token}", "--ServerApp.ip=127.0.0.1", "--LabApp.expose_app_in_browser=True"]
    log = open(tmp_path / "jupyterlab.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(f"{base}/api/status?token={token}", process)
        yield base, token, book / "nbs" / CHAPTER
    finally:
        process.terminate()
        try: process.wait(timeout=20)
        except subprocess.TimeoutExpired: process.kill()
        log.close()
    assert process.returncode is not None


CELLS = """() => {
    const notebook = window.jupyterapp.shell.currentWidget.content;
    return notebook.widgets.filter(cell => cell.model.type === 'code').map(cell => ({
        count: cell.model.executionCount,
        images: cell.model.outputs.toJSON().filter(o => o.data && o.data['image/png']).length,
        errors: cell.model.outputs.toJSON().filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)}));
}"""


def test_a_chapter_runs_in_jupyterlab(jupyterlab):
    "Open the chapter, run all cells: every code cell runs, none errs, a figure is shown."
    from playwright.sync_api import sync_playwright
    base, token, notebook = jupyterlab
    before = notebook.read_bytes()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_or_skip(), headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{base}/lab/tree/{notebook.name}?token={token}", wait_until="load")
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                               "window.jupyterapp.shell.currentWidget.sessionContext && "
                               "window.jupyterapp.shell.currentWidget.sessionContext.session && "
                               "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel && "
                               "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.connectionStatus === 'connected'",
                               timeout=120_000)
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        page.wait_for_function(f"() => ({CELLS})().every(cell => cell.count !== null) && "
                               "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                               timeout=300_000, polling=1000)
        cells = page.evaluate(CELLS)
        figures = page.evaluate("() => document.querySelectorAll('.jp-RenderedImage img').length")
        page.screenshot(path=str(ROOT / "_docs" / "screenshots" / "jupyterlab.png") if (ROOT / "_docs" / "screenshots").is_dir()
                        else str(notebook.parent / "jupyterlab.png"))
        browser.close()
    assert cells and all(cell["count"] is not None for cell in cells), "not every code cell ran"
    errors = [error for cell in cells for error in cell["errors"]]
    assert not errors, f"cells with errors: {errors}"
    assert sum(cell["images"] for cell in cells) >= 1, "no cell output a figure"
    assert figures >= 1, "no figure appeared on the page"
    assert notebook.read_bytes() == before, "JupyterLab saved the notebook (autosave should be off)"


def test_every_notebook_names_the_python3_kernel():
    "JupyterLab opens a chapter on its kernel at once (without one it asks the student to pick)."
    for notebook in sorted((ROOT / "nbs").glob("*.ipynb")):
        kernel = json.loads(notebook.read_text())["metadata"].get("kernelspec", {})
        assert kernel.get("name") == "python3", f"{notebook.name}: metadata.kernelspec should name python3"
