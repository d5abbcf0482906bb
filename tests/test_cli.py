"""The `fusedit` command: its help lists the subcommands, and errors are clean."""
import signal
import subprocess
import sys

import pytest

from fusedit.cli import COMMANDS, build_parser, main


def test_help_lists_subcommands():
    result = subprocess.run([sys.executable, "-m", "fusedit", "--help"], capture_output=True, text=True, check=True)
    for name in ("flops", "bench", "train", "sample"):
        assert name in result.stdout, name
    assert set(COMMANDS) >= {"flops", "bench", "train", "sample", "eval", "extract"}


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
    assert subprocess.run([sys.executable, "-m", "fusedit"], capture_output=True).returncode == 2  # the process exits with it


def test_every_subcommand_has_help(capsys):
    # in this process (the tests above start the command itself): a process per subcommand
    # would spend seconds each importing torch
    for name in (*COMMANDS, "bench kernels", "eval digits"):
        with pytest.raises(SystemExit) as exit_info:
            main([*name.split(), "--help"])
        output = capsys.readouterr()
        assert exit_info.value.code == 0, (name, output.err)
        assert "usage: fusedit " + name.split()[0] in output.out
        assert "(default: None)" not in output.out, name  # a flag whose default is resolved later says so in words
        if name == "train":
            assert "(0: keep all) (default: 3)" in " ".join(output.out.split())  # the other defaults are shown


def test_a_subcommand_whose_module_is_not_installed_is_left_out(monkeypatch):
    monkeypatch.setitem(COMMANDS, "gone", ("fusedit.not_installed", "a module fusedit lacks"))
    monkeypatch.setitem(COMMANDS, "gone-too", ("not_installed_package.cli", "a package that is not installed"))
    help_text = build_parser().format_help()
    assert "flops" in help_text and "lacks" not in help_text and "package that" not in help_text


def test_a_command_returning_none_succeeds_and_its_errors_exit_2_with_its_name(monkeypatch, capsys):
    import fusedit.dit.flops

    monkeypatch.setattr(fusedit.dit.flops, "main", lambda args: None)
    assert main(["flops"]) == 0

    def refuses(args):
        raise ValueError("--size 0 must be positive")

    monkeypatch.setattr(fusedit.dit.flops, "main", refuses)
    with pytest.raises(SystemExit) as exit_info:
        main(["flops"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "fusedit flops: error: --size 0 must be positive\n"


def test_ctrl_c_prints_one_line_and_ends_the_process_by_sigint():
    # where no command handles it (here: flops); dying by SIGINT, not exiting 130, is what
    # makes a shell loop around fusedit stop too
    script = ("import fusedit.cli, fusedit.dit.flops\n"
              "def interrupted(args):\n    raise KeyboardInterrupt\n"
              "fusedit.dit.flops.main = interrupted\n"
              "fusedit.cli.entry(['flops'])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (-signal.SIGINT, "fusedit: interrupted\n")


def test_main_lets_a_ctrl_c_through_to_python_callers(monkeypatch):
    import fusedit.dit.flops

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(fusedit.dit.flops, "main", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["flops"])
