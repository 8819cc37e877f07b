"""Train a network of the book on Fashion-MNIST, or print its summary.

    python -m experiments.run --arch lenet_bn --summary
"""

from __future__ import annotations

import sys

from cnnjax import models
from experiments.cli import ArgumentParser, fail, positive_int


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="run", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--arch", required=True, metavar="NAME",
                        help=f"network to use, one of: {', '.join(models.list_models())}")
    parser.add_argument("--summary", action="store_true",
                        help="print each top-level block's output shape and parameter "
                             "count, and the total, then exit")
    parser.add_argument("--resize", type=positive_int, metavar="R",
                        help="input height and width (default: the book's recipe)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.arch not in models.list_models():
        return fail(parser.prog, f"unknown --arch {args.arch!r}; valid names: "
                                 f"{', '.join(models.list_models())}")
    if not args.summary:
        return fail(parser.prog, "training is not wired into this CLI yet; use --summary")
    print(models.summary(args.arch, resize=args.resize))
    return 0


if __name__ == "__main__":
    sys.exit(main())
