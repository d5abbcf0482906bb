"""The `fusedit` command: a thin layer over functions a user can also call from Python.

Each subcommand lives in a module with `add_arguments(parser)` and `main(args) -> int`;
a subcommand whose module is not installed yet is left out of the list.
"""
import argparse
import importlib
import importlib.util
import os
import signal
import sys

COMMANDS = {
    "flops": ("fusedit.dit.flops", "Gflops and parameters of every DiT config, checked against the paper"),
    "bench": ("fusedit.bench.cli", "benchmark backends per config: images/s, MFU, memory, parity (`bench kernels`: per op)"),
    "train": ("fusedit.train.cli", "train a DiT (digits demo by default; torchrun for DDP)"),
    "sample": ("fusedit.train.sample", "sample images from a fusedit or published DiT checkpoint"),
    "eval": ("fusedit.train.evaluate", "score samples offline (`eval digits`)"),
    "extract": ("fusedit.train.extract", "encode an image folder to VAE latents for `train --data latents`"),
}


def _available_commands():
    for name, (module, help_text) in COMMANDS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            yield name, module, help_text


def build_parser():
    parser = argparse.ArgumentParser(prog="fusedit", description="Fused kernels, training and benchmarks for Diffusion Transformers.")
    from fusedit import __version__

    parser.add_argument("--version", action="version", version=f"fusedit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in _available_commands():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text,
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.main, parser=sub)
    return parser


def main(argv=None):
    """Run `fusedit ARGV`; returns the exit status (a Ctrl-C propagates as KeyboardInterrupt)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except (ValueError, OSError, RuntimeError) as error:
        # Clear, named errors from our own checks, and the file system's (a missing folder, a
        # path without write permission): print them as the command's error.
        args.parser.exit(2, f"fusedit {args.command}: error: {error}\n")


def entry(argv=None):
    """The `fusedit` command (console script, `python -m fusedit`): exits with main(argv)'s
    status. A Ctrl-C that reaches here (during the imports, or in a command without handling
    of its own) prints one line instead of a traceback, then ends the process by SIGINT, as an
    uncaught KeyboardInterrupt does: a shell loop running fusedit stops with it."""
    try:
        status = main(argv)
    except KeyboardInterrupt:
        print("fusedit: interrupted", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        raise  # where a signal cannot end the process
    sys.exit(status)


if __name__ == "__main__":
    entry()
