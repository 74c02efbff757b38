"""
Docs that cannot drift: the README's layout names every module and script, and every script's docstring starts
with the commands that run it.
"""

import glob
import os
import re

from conftest import ROOT


def readme_layout():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.search(r"## Layout\n\n```\n(.*?)```", text, re.S).group(1)


def test_readme_layout_lists_every_module_and_script():
    # catches: a module or stage script added (or renamed) without a line in the README's map of the code
    layout = readme_layout()
    words = set(re.findall(r"[\w./]+", layout))
    modules = [p for p in glob.glob(os.path.join(ROOT, "nanochat", "*.py")) if os.path.basename(p) not in words]
    scripts = [p for p in glob.glob(os.path.join(ROOT, "scripts", "*.py"))
               if os.path.basename(p).removesuffix(".py") not in words]
    missing = sorted(os.path.relpath(p, ROOT) for p in modules + scripts if not p.endswith("__init__.py"))
    assert not missing, f"README.md's Layout does not mention {missing}"


def test_readme_layout_names_no_file_that_does_not_exist():
    # catches: a module deleted or renamed while the README still describes it
    layout = readme_layout()
    listed = re.findall(r"^\s{2}(\w+\.py)\s", layout, re.M)
    assert listed, "the layout lists modules as '  name.py  description'"
    for name in listed:
        assert os.path.exists(os.path.join(ROOT, "nanochat", name)), f"README.md lists nanochat/{name}"


def test_every_script_docstring_shows_how_to_run_it():
    # catches: a stage script without the exact commands its users need at the top (nanochat's convention)
    for path in sorted(glob.glob(os.path.join(ROOT, "scripts", "*.py"))):
        name = os.path.basename(path).removesuffix(".py")
        if name == "__init__":
            continue
        source = open(path, encoding="utf-8").read()
        doc = re.match(r'"""(.*?)"""', source, re.S)
        assert doc and f"-m scripts.{name}" in doc.group(1), \
            f"{path}: the docstring names no 'python -m scripts.{name}'"
