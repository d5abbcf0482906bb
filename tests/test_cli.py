"""The `fusedit` command: its help lists the subcommands, and errors are clean."""
import subprocess
import sys

from fusedit.cli import COMMANDS, main


def test_help_lists_subcommands():
    result = subprocess.run([sys.executable, "-m", "fusedit", "--help"], capture_output=True, text=True, check=True)
    for name in ("flops", "bench", "train", "sample"):
        assert name in result.stdout, name
    assert set(COMMANDS) >= {"flops", "bench", "train", "sample", "eval", "extract"}


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_every_subcommand_has_help():
    for name in COMMANDS:
        result = subprocess.run([sys.executable, "-m", "fusedit", name, "--help"], capture_output=True, text=True)
        assert result.returncode == 0, (name, result.stderr)
        assert "usage: fusedit " + name in result.stdout


def test_ctrl_c_stops_quietly_with_status_130(monkeypatch, capsys):
    import fusedit.cli as cli_module
    import fusedit.dit.flops

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(fusedit.dit.flops, "main", interrupted)  # in a command without its own handling
    assert main(["flops"]) == 130
    monkeypatch.setattr(cli_module, "build_parser", interrupted)  # while the commands' modules import
    assert main(["flops"]) == 130
    assert capsys.readouterr().err == "fusedit: interrupted\n" * 2
