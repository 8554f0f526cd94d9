"""The environment holds its pins: nbdev 2.4.14 runs only with fastcore 1.8, so constraints.txt pins
fastcore, nbdev and execnb, and tools/setup.sh names that file in the venv's pip config so that a
later `pip install` (transformers, the extras again) cannot upgrade fastcore past nbdev 2."""
import configparser, importlib.util, re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_env", ROOT / "tools" / "check_env.py")
check_env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_env)
PINS = check_env.pins()


def settings():
    config = configparser.ConfigParser(delimiters=["="])
    config.read(ROOT / "settings.ini", encoding="utf-8")
    return config["DEFAULT"]


@pytest.mark.parametrize("name", ["fastcore", "nbdev", "execnb"])
def test_installed_versions_are_the_pins(name):
    "fastcore, nbdev and execnb are installed at exactly their versions in constraints.txt."
    assert name in PINS, f"constraints.txt pins no {name}"
    assert check_env.installed(name) == PINS[name], \
        f"{name} {check_env.installed(name)} installed, constraints.txt pins {PINS[name]}: run bash tools/setup.sh"


def test_settings_agree_with_constraints():
    "Every exact pin in settings.ini's requirements is the one in constraints.txt, and nbdev goes in without its deps."
    cfg = settings()
    nodeps = cfg.get("nodeps_requirements", "").split()
    assert f"nbdev=={PINS['nbdev']}" in nodeps
    for key in ("requirements", "dev_requirements", "bench_requirements", "nodeps_requirements"):
        for req in cfg.get(key, "").split():
            if "==" in req:
                name, want = req.split("==")
                assert PINS.get(name.lower()) == want, f"settings.ini {key} has {req}, constraints.txt {PINS.get(name.lower())}"
    assert not any(re.match(r"nbdev\b(?!-)", r, re.I) for r in cfg["dev_requirements"].split()), \
        "nbdev in the dev extra: pip's resolver would then need its declared fastcore>=1.12.3"


def test_pip_config_names_constraints():
    "In the .venv that tools/setup.sh makes, pip's config gives every `pip install` constraints.txt."
    if not check_env.in_setup_venv(): pytest.skip("not running in this repository's .venv (made by tools/setup.sh)")
    site_conf = configparser.ConfigParser()
    site_conf.read(Path(check_env.sys.prefix) / "pip.conf")
    assert site_conf.get("install", "constraint", fallback="").split() == [str(check_env.CONSTRAINTS)], \
        ".venv/pip.conf names no constraints.txt: run bash tools/setup.sh"
    assert str(check_env.CONSTRAINTS) in [str(Path(f).resolve()) for f in check_env.pip_constraints()], \
        "pip config list does not give constraints.txt (is PIP_CONSTRAINT set?)"


def test_check_env_passes():
    "The check tools/test.sh starts with finds nothing wrong."
    assert check_env.off_pins() == []
