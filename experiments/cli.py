"""Shared CLI plumbing: `-c PRESET.yaml` layers + `key.sub=value` overrides, one-line errors with exit code 2."""
from __future__ import annotations

import argparse
import os
import sys

from experiments.config import ConfigError, load_config


def config_parser(description: str, epilog: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", action="append", default=[], metavar="PRESET.yaml",
                   help="YAML preset(s), merged in order over the typed defaults (experiments/config.py)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, applied last")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def write_json(path: str, obj) -> None:
    """A CLI's --out JSON (its folder created), indented for reading."""
    import json
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def say(line: str, *, alone: bool = False) -> None:
    """``line`` on stderr in one write. ``alone`` is for a running multi-rank job, whose ranks and rank 0's progress
    display share one stream (a SLURM log): a newline first ends a half-drawn bar, and a single write keeps their
    output out of the middle of the line (print() writes the text and its newline separately), so
    `grep '^error: '` finds it."""
    text = ("\n" if alone else "") + line + "\n"
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (AttributeError, OSError, ValueError):  # no file descriptor (a captured stream): the stream's own write
        sys.stderr.write(text)
        sys.stderr.flush()


def fail(message: str, code: int = 2, *, alone: bool = False) -> "NoReturn":  # noqa: F821
    say(f"error: {message}", alone=alone)
    raise SystemExit(code)


def parse_config(args):
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        fail(f"config {err}")


def pretokenize(argv=None) -> int:
    """``roar-pretokenize``. The console script enters here, not at tokenizers.pretokenize: in an installed wheel
    ``import tokenizers`` alone finds Hugging Face's package, and importing this package first (its __init__
    runs lightning_modules.compat) is what makes ``tokenizers.pretokenize`` ours."""
    from tokenizers.pretokenize import cli

    return cli(argv)
