"""Every command's --help shows its whole description: the module docstring's first paragraph
in full, before the options (issue 32 item 4: `icd-run --help` cut it after its first line)."""
import importlib
import inspect
import os
import re
from pathlib import Path
from unittest import mock

import pytest

SETUP = Path(__file__).resolve().parent.parent / "setup.py"


def console_scripts():
    """(command, module, function) of every console script that setup.py installs."""
    return re.findall(r'"([\w-]+) = ([\w.]+):(\w+)"', SETUP.read_text(encoding="utf-8"))


def first_paragraph(module) -> str:
    """The module docstring's first paragraph, its blanks collapsed."""
    return " ".join(inspect.cleandoc(module.__doc__).split("\n\n")[0].split())


def test_setup_installs_the_commands():
    assert len(console_scripts()) >= 15


@pytest.mark.parametrize("script", console_scripts(), ids=lambda s: s[0])
def test_help_shows_the_whole_first_paragraph_before_the_options(script, capsys):
    command, module_name, function = script
    with mock.patch.dict(os.environ):   # icd-parity sets MXNet's variables when imported
        module = importlib.import_module(module_name)
        try:
            status = getattr(module, function)(["--help"])
        except SystemExit as e:
            status = e.code
    assert status in (0, None), command
    text = capsys.readouterr().out
    assert "options:" in text, command
    before = " ".join(text[:text.index("options:")].split())
    assert first_paragraph(module) in before, command


def test_the_commands_package_lists_every_command_with_its_module_and_wrapper():
    import icd.commands
    rows = {line.split()[0]: line.split()[1:3] for line in icd.commands.__doc__.splitlines()
            if line.strip().startswith("icd-")}
    for command, module_name, _ in console_scripts():
        module, wrapper = rows[command]
        assert module_name.endswith("." + module), command
        assert module_name in (SETUP.parent / wrapper).read_text(encoding="utf-8"), command


def test_icd_launch_shows_its_help_only_for_its_own_help_flag():
    """`icd-launch -n 2 -- icd-train --help` starts the job (the command's help on every worker);
    only a -h / --help among the launcher's options is the launcher's."""
    from icd.commands.launch import _asks_help
    assert _asks_help(["--help"]) and _asks_help(["-n", "2", "--launcher=local", "-h"])
    assert not _asks_help(["-n", "2", "--", "icd-train", "--help"])
    assert not _asks_help(["-n", "2", "icd-train", "--help"])
    assert not _asks_help(["-H", "--help"])   # a host file named --help
