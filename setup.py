"""Packaging for scfoundation: every field comes from settings.ini (nbdev 2 layout)."""
from configparser import ConfigParser

import setuptools

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

licenses = {"apache2": ("Apache Software License 2.0", "OSI Approved :: Apache Software License")}
statuses = ["Planning", "Pre-Alpha", "Alpha", "Beta", "Production/Stable", "Mature", "Inactive"]
lic = licenses[cfg["license"]]
requirements = cfg.get("requirements", "").split()
dev_requirements = cfg.get("dev_requirements", "").split()
bench_requirements = cfg.get("bench_requirements", "").split()  # peers that bench/ compares against
scvi_requirements = cfg.get("scvi_requirements", "").split()    # scVI, a baseline of chapters 7 and 9
scripts = [s.strip() for s in cfg.get("console_scripts", "").split() if s.strip()]

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license=lic[0],
    classifiers=[
        "Development Status :: " + str(cfg["status"]) + " - " + statuses[int(cfg["status"])],
        "Intended Audience :: " + cfg["audience"],
        "License :: " + lic[1],
        "Natural Language :: " + cfg["language"],
        "Programming Language :: Python :: 3",
    ],
    url=cfg["git_url"],
    author=cfg["author"],
    author_email=cfg["author_email"],
    keywords=cfg["keywords"],
    packages=setuptools.find_packages(include=["scfoundation", "scfoundation.*"]),
    include_package_data=True,
    package_data={"scfoundation": ["assets/*"]},
    install_requires=requirements,
    extras_require={"dev": dev_requirements, "bench": bench_requirements, "scvi": scvi_requirements},
    python_requires=">=" + cfg["min_python"],
    entry_points={"console_scripts": scripts, "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False,
)
