"""Command-line entry points. Each is a thin wrapper around the Python API.

Bad input ends in one line on stderr and exit status 2; an interrupted run
says how to resume and exits with 130.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .errors import FastDartsError
from .genotype import GENOTYPES, get_genotype
from .mixed_op import MIXED_OP_BACKENDS
from .search_loop import SearchConfig, search


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr, like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def search_parser() -> argparse.ArgumentParser:
    d = SearchConfig()
    p = _Parser(
        prog="fastdarts-search",
        description="DARTS architecture search (Liu et al., 2019). Defaults are the paper's CIFAR-10 search.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default=d.dataset, choices=["cifar10", "digits"],
                      help="cifar10, or scikit-learn's bundled 8x8 digits (offline)")
    data.add_argument("--data", default=d.data, help="directory holding (or receiving) CIFAR-10")
    data.add_argument("--download", action="store_true", help="download CIFAR-10 into --data if missing")
    space = p.add_argument_group("search space")
    space.add_argument("--ops", default=d.ops, help="op set (darts, extended) or comma-separated op names")
    shape = space.add_mutually_exclusive_group()
    shape.add_argument("--layers", type=_positive_int, default=d.layers,
                       help="number of cells; reductions at layers//3 and 2*layers//3")
    shape.add_argument("--layout", default=None, help="explicit cell layout such as N,R,N (replaces --layers)")
    space.add_argument("--channels", type=_positive_int, default=d.channels, help="initial channels C")
    space.add_argument("--steps", type=_positive_int, default=d.steps, help="intermediate nodes per cell")
    space.add_argument("--multiplier", type=_positive_int, default=d.multiplier,
                       help="intermediate nodes concatenated by the cell output")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    opt.add_argument("--epochs", type=_positive_int, default=d.epochs)
    opt.add_argument("--order", choices=["first", "second"], default=d.order,
                     help="first- or second-order architecture gradient")
    opt.add_argument("--lr", type=float, default=d.lr, help="weight learning rate (cosine-annealed)")
    opt.add_argument("--lr-min", type=float, default=d.lr_min)
    opt.add_argument("--momentum", type=float, default=d.momentum)
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay)
    opt.add_argument("--grad-clip", type=float, default=d.grad_clip)
    opt.add_argument("--arch-lr", type=float, default=d.arch_lr)
    opt.add_argument("--arch-weight-decay", type=float, default=d.arch_weight_decay)
    run = p.add_argument_group("run")
    run.add_argument("--backend", choices=list(MIXED_OP_BACKENDS), default=d.backend,
                     help="how mixed operations are evaluated")
    run.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--out", default=d.out, help="output directory (checkpoint, metrics, genotype, pictures)")
    run.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    run.add_argument("--max-steps", type=_positive_int, default=None,
                     help="cap the steps of each epoch (a quick smoke test)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def search_main(argv: Sequence[str] | None = None) -> int:
    args = search_parser().parse_args(argv)
    config = SearchConfig(**vars(args))
    try:
        search(config)
    except (FastDartsError, OSError) as e:  # OSError: an unwritable --out, a full disk
        print(f"fastdarts-search: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nfastdarts-search: interrupted; continue with the same command plus --resume "
              f"(finished epochs are in {config.out}/checkpoint.pt)", file=sys.stderr)
        return 130
    return 0


def genotype_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fastdarts-genotype",
        description="Print a genotype and draw its cells (normal.png, reduce.png).")
    p.add_argument("genotype", help=f"a published name ({', '.join(GENOTYPES)}) or a genotype.json file")
    p.add_argument("--out", help="directory for the cell pictures (none drawn without it)")
    return p


def genotype_main(argv: Sequence[str] | None = None) -> int:
    args = genotype_parser().parse_args(argv)
    try:
        genotype = get_genotype(args.genotype)
        print(genotype)
        if args.out:
            from .visualize import plot_genotype

            for path in plot_genotype(genotype, args.out):
                print(f"wrote {path}")
    except FastDartsError as e:
        print(f"fastdarts-genotype: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(search_main())
