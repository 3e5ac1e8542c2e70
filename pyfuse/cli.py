"""``pyfuse``: one entry point, one module per subcommand (mlx-lm style).

Each module in ``pyfuse.commands`` defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Flags are kebab-case and
map 1:1 to the keyword arguments of the Python API they call.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError
from .io.files import Terminated, sigterm_as_interrupt
from .io.outputs import check_paths

# subcommand name -> module in pyfuse.commands
COMMANDS = {
    "fuse": "fuse",
    "noise-floor": "noise_floor",
    "train": "train",
    "eval": "evaluate",
    "setg": "setg",
    "stats": "stats",
    "zero-adapter": "zero_adapter",
    "experiment": "experiment",
    "demo": "demo",
}


def _available_commands():
    for name, module in COMMANDS.items():
        try:
            yield name, importlib.import_module(f"pyfuse.commands.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"pyfuse.commands.{module}":
                raise  # a real missing dependency inside an existing command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyfuse",
        description="Fuse LoRA adapters into quantized MLX models and measure what survives.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _available_commands():
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _prog=f"pyfuse {name}", _inputs=getattr(module, "INPUTS", {}),
                       _outputs=getattr(module, "OUTPUTS", {}),
                       _nested_ok=getattr(module, "NESTED_OK", ()))
    return parser


def command_paths(args: argparse.Namespace) -> tuple[dict, dict]:
    """``(inputs, outputs)`` of a parsed command line, ``{flag: path}``: each
    command module lists its path flags as ``INPUTS``/``OUTPUTS``
    (``{argparse dest: flag}``), checked before it runs."""
    def pick(table):
        return {flag: getattr(args, dest, None) for dest, flag in table.items()}

    return pick(args._inputs), pick(args._outputs)


def os_error_line(err: OSError) -> str:
    """An OSError as one line: what failed, where, and why."""
    where = f"{err.filename}: " if err.filename else ""
    if getattr(err, "filename2", None):
        where = f"{err.filename} -> {err.filename2}: "
    return f"{where}{err.strerror or err} (nothing was left half-written)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        with sigterm_as_interrupt():
            check_paths(*command_paths(args), nested_ok=args._nested_ok)
            return int(args._run(args) or 0)
    except UserError as err:
        print(f"{args._prog}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only or full disk, a directory where a file goes, permissions
        print(f"{args._prog}: error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except Terminated:  # SIGTERM: the shell convention 128 + 15
        print(f"{args._prog}: terminated; nothing was left half-written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:  # Ctrl-C / SIGINT: 128 + 2
        print(f"{args._prog}: interrupted; nothing was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
