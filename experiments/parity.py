"""Check our modules against official parity fixtures and decode traces (tests/assets/parity/README.md).

    python -m experiments.parity --fixture tests/assets/parity/randar_tiny.pt
    python -m experiments.parity --fixture a.pt --fixture tests/assets/parity/decode_arpg_tiny.pt --atol 1e-5

One line per output: file, output name, max |ours - official| (or the mismatch count for integer outputs such
as VQ codes, decode positions and the final grid, which must be exact), ok/FAIL. The LAST line is the overall
max abs difference over all float outputs: ``max_abs_diff 1.234e-06``.
Exit codes: 0 all within tolerance and all integer outputs exact; 1 any failure (including weights our module
tree does not accept); 2 a file that is not a readable / complete fixture (a one-line error naming it).
Runs on the CPU in float32.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.parity", description=__doc__.splitlines()[0],
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixture", action="append", required=True, metavar="FILE",
                   help="a parity fixture or decode trace (.pt); repeat for several")
    p.add_argument("--atol", type=float, default=1e-4, help="max abs difference allowed for float outputs")
    return p.parse_args(argv)


def format_line(report, name: str) -> str:
    value, verdict = report[name], "ok" if report.passed(name) else "FAIL"
    if name in report.exact:
        return f"{report.source}  {name:<28} mismatches {int(value)}  {verdict}"
    return f"{report.source}  {name:<28} {value:.3e}  {verdict}"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from lightning_modules.official.parity import FixtureError, load_fixture, run_fixture

    torch.backends.cuda.matmul.allow_tf32 = False  # CPU anyway; keep TF32 off should anything touch a GPU
    try:  # read every file first, so an unreadable one stops the run before any work (exit 2)
        fixtures = [(path, load_fixture(path)) for path in args.fixture]
    except FixtureError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    worst, failed, malformed = 0.0, False, False
    for path, fx in fixtures:
        try:
            report = run_fixture(fx, atol=args.atol)
        except KeyError as err:  # a fixture without an entry its format requires: unreadable input
            print(f"error: {path}: not a complete {fx['family']} fixture (missing entry {err})", file=sys.stderr)
            malformed = True
            continue
        except (ValueError, RuntimeError) as err:  # e.g. weights our module tree does not accept
            print(f"{path}  FAIL: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            failed = True
            continue
        report.source = path
        for name in report:
            print(format_line(report, name))
        for note in report.notes:
            print(f"{path}  note: {note}")
        worst = max(worst, report.max_abs_diff())
        failed = failed or not report.ok
    print(f"max_abs_diff {worst:.3e}")
    return 2 if malformed else 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
