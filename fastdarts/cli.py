"""Command-line entry points. Each is a thin wrapper around the Python API.

Bad input ends in one line on stderr and exit status 2; an interrupted run
says how to resume and exits with 130.

``fastdarts-search``, ``fastdarts-train`` and ``fastdarts-eval`` also run under torchrun (SPEC §10;
``fastdarts.distributed``): the first line says the world size and backend,
and rank 0 prints. Bad arguments are reported by rank 0 alone (every rank
checks the same ones); an error met by another rank is printed by it, named
"rank r of N". A rank that loses the others (one stopped or hung) says so
in one line and exits with status 3, with the resume hint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from . import distributed
from .errors import FastDartsError
from .files import WriteError
from .genotype import GENOTYPES, get_genotype
from .method import PRESETS, Option, method_options
from . import methods  # noqa: F401  (registers the methods beyond DARTS, whose flags follow)
from .mixed_op import MIXED_OP_BACKENDS
from .recompute import RECOMPUTE_MODES
from .data import DATASETS
from .search_config import DEFAULT_LAYERS, STEMS, SearchConfig
from .search_loop import search
from .train_loop import IMAGENET_TRAINING, LR_SCHEDULES, NETWORK_KINDS, TrainConfig, train


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr, like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (unset: the help text says what decides)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _by_method(field: str, unset: str | None = None) -> str:
    """Help text for a flag whose default is the method's preset; with ``unset`` (what no value means),
    only the presets that set it are listed."""
    off = method_options()[field].off if field in method_options() else None
    if unset is not None:
        values = ", ".join(f"{name}: {p[field]}" for name, p in PRESETS.items() if p.get(field) is not None)
        return f"(default: {unset}" + (f"; {values})" if values else ")")
    values = ", ".join(f"{name}: {preset.get(field, off)}" for name, preset in PRESETS.items())
    return f"(default: the method's; {values})"


_KINDS: dict[str, dict[str, Any]] = {
    "positive_int": dict(type=_positive_int),
    "non_negative_int": dict(type=_non_negative_int),
    "flag": dict(action="store_true"),
    "bool": dict(action=argparse.BooleanOptionalAction),
    "text": {},
    "list": dict(action="append"),
}


def _add_option(group, option: Option) -> None:
    """A method's option as a flag (``--name-with-dashes``); unset (None) unless given."""
    if option.kind not in _KINDS:
        raise FastDartsError(f"option {option.name!r}: unknown kind {option.kind!r}; known: {', '.join(_KINDS)}")
    named = any(option.name in preset for preset in PRESETS.values())
    group.add_argument("--" + option.name.replace("_", "-"), default=None, **_KINDS[option.kind],
                       **({"metavar": option.metavar} if option.metavar and option.kind not in ("flag", "bool") else {}),
                       help=option.help + (" " + _by_method(option.name) if named else ""))


_DATASET_HELP = ("cifar10, cifar100 (both downloaded with --download), digits (scikit-learn's 8x8 digits, offline), "
                 "folder (your images: --data DIR holding train/<class>/ and val/<class>/), or imagenet (the same "
                 "layout of JPEGs, decoded as they are read)")
_DATA_HELP = "CIFAR's folder (also where --download puts it), or the folder holding train/ and val/ (or test/)"


def _data_options(group, d, *, training: bool = True) -> None:
    """The data flags every command shares (``d``: the command's config defaults)."""
    group.add_argument("--dataset", default=d.dataset, choices=list(DATASETS), help=_DATASET_HELP)
    group.add_argument("--data", default=d.data, help=_DATA_HELP)
    group.add_argument("--download", action="store_true", help="download CIFAR-10/100 into --data if missing")
    if training:  # evaluation takes the size the network was trained at
        group.add_argument("--image-size", type=_positive_int, default=None, metavar="S",
                           help="folder: shorter side resized to S, centre-cropped to SxS (default: the median "
                                "image's shorter side, at most 64); imagenet: the training crop (default 224)")
    group.add_argument("--skip-bad-images", action="store_true",
                       help="folder: drop (and count) unreadable images instead of stopping at the first")
    group.add_argument("--workers", type=_non_negative_int, default=None,
                       help="processes decoding images (imagenet; a folder's first read): default the usable "
                            "cores less one, at most 8; 0 decodes in this process")
    group.add_argument("--data-budget-mb", type=float, default=None, metavar="MB",
                       help="hold uint8 images on the device up to this size, stream them from host memory "
                            "beyond it (default: a quarter of the device's memory; 0: always stream)")


def search_parser() -> argparse.ArgumentParser:
    d = SearchConfig()
    p = _Parser(
        prog="fastdarts-search",
        description="Differentiable architecture search: DARTS (Liu et al., 2019), PC-DARTS (Xu et al., 2020), "
                    "ProxylessNAS-style path sampling (Cai et al., 2019) or P-DARTS' progressive search (Chen et "
                    "al., 2019). Defaults are each method's published CIFAR-10 search; a flag given explicitly wins "
                    "over the method's value.",
        formatter_class=_Help)
    p.add_argument("--method", default=d.method, choices=list(PRESETS),
                   help="search method; sets the flags marked 'the method's'")
    data = p.add_argument_group("data")
    _data_options(data, d)
    data.add_argument("--subset", type=float, default=None, metavar="FRACTION",
                      help="search on a class-balanced FRACTION of each class for the weights and a disjoint "
                           "FRACTION/4 for α, as PC-DARTS' ImageNet search (0.1: 10 %% and 2.5 %%) "
                           + _by_method("subset", "none: DARTS' halves of the training set"))
    space = p.add_argument_group("search space")
    space.add_argument("--stem", choices=list(STEMS), default=None,
                       help="cifar: one 3x3 convolution; imagenet: PC-DARTS' three stride-2 3x3 convolutions "
                            "(224 -> 28) (default: imagenet for --dataset imagenet, else cifar)")
    space.add_argument("--ops", default=d.ops, help="op set (darts, extended) or comma-separated op names")
    shape = space.add_mutually_exclusive_group()
    shape.add_argument("--layers", type=_positive_int, default=d.layers,
                       help=f"number of cells (default {DEFAULT_LAYERS}); reductions at layers//3 and 2*layers//3")
    shape.add_argument("--layout", default=None, help="explicit cell layout such as N,R,N (replaces --layers)")
    space.add_argument("--channels", type=_positive_int, default=d.channels, help="initial channels C")
    space.add_argument("--steps", type=_positive_int, default=d.steps, help="intermediate nodes per cell")
    space.add_argument("--multiplier", type=_positive_int, default=d.multiplier,
                       help="intermediate nodes concatenated by the cell output")
    method = p.add_argument_group("method options (each on its own too)")
    method.add_argument("--arch-warmup-epochs", type=_non_negative_int, default=None, metavar="E",
                        help="no architecture step in the first E epochs " + _by_method("arch_warmup_epochs"))
    method.add_argument("--arch-every", type=_positive_int, default=None, metavar="K",
                        help="an architecture step after every K-th weight batch " + _by_method("arch_every"))
    method.add_argument("--arch-after-weights", action=argparse.BooleanOptionalAction, default=None,
                        help="the architecture step follows the weight step instead of preceding it "
                             + _by_method("arch_after_weights"))
    for option in method_options().values():  # every registered method's flags
        _add_option(method, option)
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=_positive_int, default=None, help=_by_method("batch_size"))
    opt.add_argument("--epochs", "--stage-epochs", type=_positive_int, default=None,
                     help="epochs of the search (with --stages: of each stage) " + _by_method("epochs"))
    opt.add_argument("--order", choices=["first", "second"], default=None,
                     help="first- or second-order architecture gradient " + _by_method("order"))
    opt.add_argument("--lr", type=float, default=None,
                     help="weight learning rate (cosine-annealed) " + _by_method("lr"))
    opt.add_argument("--lr-min", type=float, default=None, help=_by_method("lr_min"))
    opt.add_argument("--momentum", type=float, default=d.momentum)
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay)
    opt.add_argument("--grad-clip", type=float, default=d.grad_clip)
    opt.add_argument("--arch-lr", type=float, default=None, help=_by_method("arch_lr"))
    opt.add_argument("--arch-weight-decay", type=float, default=None, help=_by_method("arch_weight_decay"))
    opt.add_argument("--arch-grad-clip", type=float, default=None,
                     help="clip the architecture gradient's norm before Adam " + _by_method("arch_grad_clip"))
    opt.add_argument("--arch-beta1", type=float, default=None,
                     help="Adam's β1 on α (β2 is 0.999) " + _by_method("arch_beta1"))
    run = p.add_argument_group("run")
    run.add_argument("--backend", choices=list(MIXED_OP_BACKENDS), default=d.backend,
                     help="mixed-op implementation: fused (memory-lean kernels), reference (the original "
                          "code's), checkpoint (torch.utils.checkpoint); FASTDARTS_BACKEND picks the kernels")
    run.add_argument("--recompute", choices=list(RECOMPUTE_MODES), default=d.recompute,
                     help="edge: what the backend keeps; cell: each cell keeps only its inputs and rebuilds "
                          "its nodes in backward (less memory, one more forward per cell, same results)")
    _cuda_graph_option(run, d.cuda_graph)
    run.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--out", default=d.out, help="output directory (checkpoint, metrics, genotype, pictures)")
    run.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    run.add_argument("--max-steps", type=_positive_int, default=None,
                     help="cap the steps of each epoch (a quick smoke test)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _run(prog: str, action: Callable[[], Any], resume_from: str | None = None, *, rank: int = 0,
         world_size: int = 1, quiet: bool = False, resume_file: str = "checkpoint.pt",
         kept: str = "finished epochs are in {}/checkpoint.pt") -> tuple[int, Any]:
    """(exit status, result) of a command's work: a FastDartsError or OSError
    (an unwritable --out, a full disk) is one line and status 2; Ctrl-C is
    status 130, with the resume hint when the run keeps checkpoints (``kept``:
    what it keeps where, ``{}`` standing for ``resume_from``; ``resume_file``:
    the file --resume reads there); a lost rank of a
    multi-process run (``distributed.RankLost``) is status 3.
    ``rank``/``world_size``: this process's place in such a run, named in
    the errors of ranks other than 0; ``quiet``: print nothing."""
    who = f"rank {rank} of {world_size}: " if rank else ""
    try:
        return 0, action()
    except distributed.RankLost as e:
        if not quiet:
            hint = (f"; {kept.format(resume_from)}: rerun the same command with --resume" if resume_from else "")
            print(f"{prog}: error: {e}{hint}", file=sys.stderr)
        return 3, None
    except (FastDartsError, OSError) as e:
        hint = ""
        if isinstance(e, WriteError) and resume_from:
            # The previous checkpoint is whole: once there is room again the run goes on from it.
            again = ("the same command plus --resume" if (Path(resume_from) / resume_file).is_file()
                     else "the same command")
            hint = f"; free space (or fix the folder) and run {again}"
        if not quiet:
            print(f"{prog}: error: {who}{e}{hint}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        # Ctrl-C reaches every rank: rank 0 speaks for them.
        if not quiet and not rank:
            hint = (f"; continue with the same command plus --resume ({kept.format(resume_from)})"
                    if resume_from else "")
            print(f"\n{prog}: interrupted{hint}", file=sys.stderr)
        return 130, None


def _run_distributed(prog: str, action: Callable[[distributed.DistContext], Any], *, device: str,
                     batch_size: int | Callable[[], int], resume_from: str | None = None) -> tuple[int, Any]:
    """``_run`` of ``action(context)`` in the process group torchrun's
    environment describes (a single process without torchrun). The global
    batch (or the function that validates the configuration and returns it)
    is checked first, before any rank waits for the others; only rank 0 says
    what is wrong."""
    status, place = _run(prog, distributed.launch_env)
    if status:
        return status, None
    rank, world_size = place
    status, _ = _run(prog, lambda: distributed.per_rank_batch(batch_size() if callable(batch_size) else batch_size,
                                                              world_size), quiet=rank != 0)
    if status:
        return status, None

    def work():
        with distributed.launch(device) as context:
            if context.is_main:
                print(context.describe(), flush=True)
            return action(context)

    return _run(prog, work, resume_from, rank=rank, world_size=world_size)


def search_main(argv: Sequence[str] | None = None) -> int:
    config = SearchConfig(**vars(search_parser().parse_args(argv)))
    # search() takes its place in the process group that _run_distributed set up.
    return _run_distributed("fastdarts-search", lambda context: search(config), device=config.device,
                            batch_size=lambda: config.checked().batch_size, resume_from=config.out)[0]


def genotype_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fastdarts-genotype",
        description="Print a genotype and draw its cells (normal.png, reduce.png).")
    p.add_argument("genotype", help=f"a published name ({', '.join(GENOTYPES)}) or a genotype.json file")
    p.add_argument("--out", help="directory for the cell pictures (none drawn without it)")
    return p


def genotype_main(argv: Sequence[str] | None = None) -> int:
    args = genotype_parser().parse_args(argv)

    def show() -> None:
        genotype = get_genotype(args.genotype)
        print(genotype)
        if args.out:
            from .visualize import plot_genotype

            for path in plot_genotype(genotype, args.out):
                print(f"wrote {path}")

    return _run("fastdarts-genotype", show)[0]


def _fast_options(group, what: str, bf16_default: bool = True) -> None:
    """--bf16 / --channels-last, each with its --no- form; unset means on for CUDA, off on the CPU
    (bf16: off everywhere unless asked for when not ``bf16_default``)."""
    default = ("on for CUDA devices that support it, off on the CPU" if bf16_default
               else "off: the accuracy is the float32 one")
    group.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help=f"bf16 autocast for {what} (default: {default})")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="channels-last memory format (default: on for CUDA, off on the CPU)")


def _cuda_graph_option(group, default: bool) -> None:
    group.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=default,
                       help="capture each epoch's step as a CUDA graph once and replay it (one launch per step; "
                            "CUDA only; not yet validated on a GPU, hence off by default)")


def train_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = _Parser(
        prog="fastdarts-train",
        description="Train a genotype's network from scratch and test it after every epoch. "
                    "Defaults are the paper's CIFAR-10 evaluation (20 cells, C=36, 600 epochs).",
        formatter_class=_Help)
    p.add_argument("--genotype", default=d.genotype,
                   help=f"a published genotype ({', '.join(GENOTYPES)}) or a genotype.json from fastdarts-search")
    data = p.add_argument_group("data")
    _data_options(data, d)
    data.add_argument("--cutout", type=_non_negative_int, default=None,
                      help="cutout square side in pixels, 0 for none (default: 16 on 32x32 images, "
                           "the same fraction of other sizes: 4 on digits)")
    net = p.add_argument_group("network")
    net.add_argument("--network", choices=list(NETWORK_KINDS), default=None,
                     help="cifar: NetworkCIFAR; imagenet: NetworkImageNet (three stride-2 stem convolutions) "
                          "(default: imagenet for --dataset imagenet, else cifar)")
    net.add_argument("--layers", type=_positive_int, default=None,
                     help="number of cells; reductions at layers//3 and 2*layers//3 " + _by_dataset("layers"))
    net.add_argument("--channels", type=_positive_int, default=None, help="initial channels C "
                     + _by_dataset("channels"))
    net.add_argument("--no-auxiliary", dest="auxiliary", action="store_false", default=None,
                     help="no auxiliary head (default: one after the cell at 2/3 depth)")
    net.add_argument("--auxiliary-weight", type=float, default=None, help=_by_dataset("auxiliary_weight"))
    net.add_argument("--drop-path-prob", type=float, default=None,
                     help="drop-path probability p, ramped linearly from 0 in the first epoch to p*(E-1)/E in the "
                          "last (E = --epochs), as in the original code " + _by_dataset("drop_path_prob"))
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=_positive_int, default=None, help=_by_dataset("batch_size"))
    opt.add_argument("--epochs", type=_positive_int, default=None, help=_by_dataset("epochs"))
    opt.add_argument("--lr", type=float, default=None, help="learning rate " + _by_dataset("lr"))
    opt.add_argument("--lr-schedule", choices=list(LR_SCHEDULES), default=None,
                     help="cosine: annealed to --lr-min; exponential: lr * gamma^epoch " + _by_dataset("lr_schedule"))
    opt.add_argument("--lr-min", type=float, default=d.lr_min)
    opt.add_argument("--lr-gamma", type=float, default=d.lr_gamma, help="the exponential schedule's factor per epoch")
    opt.add_argument("--warmup-epochs", type=_non_negative_int, default=d.warmup_epochs,
                     help="ramp the lr linearly over the first epochs (PC-DARTS' ImageNet training at batch 1024: 5)")
    opt.add_argument("--lr-reference-batch", type=_positive_int, default=None, metavar="B",
                     help="scale --lr by batch-size / B (the linear scaling rule for large batches; e.g. 128 "
                          "for DARTS' ImageNet lr)")
    opt.add_argument("--label-smoothing", type=float, default=None, help=_by_dataset("label_smoothing"))
    opt.add_argument("--momentum", type=float, default=d.momentum)
    opt.add_argument("--weight-decay", type=float, default=None, help=_by_dataset("weight_decay"))
    opt.add_argument("--grad-clip", type=float, default=d.grad_clip)
    run = p.add_argument_group("run")
    _fast_options(run, "training and testing")
    _cuda_graph_option(run, d.cuda_graph)
    run.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--out", default=d.out,
                     help="output directory (checkpoint.pt, best.pt, last.pt, metrics.jsonl, curves.png)")
    run.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    run.add_argument("--max-steps", type=_positive_int, default=None,
                     help="cap the train and test steps of each epoch (a quick smoke test)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _by_dataset(field: str) -> str:
    """Help text for a training flag whose default depends on the data set."""
    return f"(default {getattr(TrainConfig(), field)}; --dataset imagenet: {IMAGENET_TRAINING[field]})"


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The training configuration of parsed flags: those not given take the data set's defaults
    (DARTS' ImageNet training for --dataset imagenet, the paper's CIFAR-10 training otherwise)."""
    given = vars(args)
    defaults = {**{k: getattr(TrainConfig(), k) for k in IMAGENET_TRAINING},
                **(IMAGENET_TRAINING if given["dataset"] == "imagenet" else {})}
    return TrainConfig(**{k: (defaults[k] if k in defaults and v is None else v) for k, v in given.items()})


def train_main(argv: Sequence[str] | None = None) -> int:
    config = train_config(train_parser().parse_args(argv))
    # train() takes its place in the process group that _run_distributed set up.
    return _run_distributed("fastdarts-train", lambda context: train(config), device=config.device,
                            batch_size=config.batch_size, resume_from=config.out)[0]


def eval_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fastdarts-eval",
        description="Test accuracy (top-1, top-5) and parameter count of a trained network: best.pt, last.pt or "
                    "checkpoint.pt of fastdarts-train, or a state_dict saved by the original DARTS code "
                    "(then name its --genotype).",
        formatter_class=_Help)
    p.add_argument("checkpoint", help="weights file")
    p.add_argument("--genotype", default=None,
                   help=f"required for an original DARTS state_dict ({', '.join(GENOTYPES)} or a genotype.json); "
                        "for a fastdarts file, checked against the one it was trained with")
    p.add_argument("--channels", type=_positive_int, default=None, help="check the network's initial channels")
    p.add_argument("--layers", type=_positive_int, default=None, help="check the network's number of cells")
    _data_options(p, argparse.Namespace(dataset=None, data="./data"), training=False)
    p.add_argument("--batch-size", type=_positive_int, default=256)
    _fast_options(p, "the forward passes", bf16_default=False)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return p


def _print_eval(result: dict, path: str) -> None:
    where = result["source"] + (f", epoch {result['epoch']}" if result.get("epoch") else "")
    print(f"{path} ({where}): {result['dataset']} test set, {result['images']} images")
    print(f"test accuracy: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
          f"(error {100 - result['top1']:.2f}%, loss {result['loss']:.4f})")
    print(f"parameters: {result['parameters'] / 1e6:.2f} M ({result['parameters']:,}; "
          f"{result['parameters_with_auxiliary']:,} with the auxiliary head); multiply-adds: "
          f"{result['multiply_adds'] / 1e6:.1f} M per image at {'x'.join(map(str, result['input_shape']))}")


def eval_main(argv: Sequence[str] | None = None) -> int:
    args = eval_parser().parse_args(argv)
    from .evaluate import evaluate_checkpoint

    def evaluate(context: distributed.DistContext) -> dict | None:
        result = evaluate_checkpoint(
            args.checkpoint, genotype=args.genotype, channels=args.channels, layers=args.layers, dataset=args.dataset,
            data=args.data, download=args.download, batch_size=args.batch_size, device=args.device, bf16=args.bf16,
            channels_last=args.channels_last, dist=context, workers=args.workers, data_budget_mb=args.data_budget_mb,
            skip_bad_images=args.skip_bad_images)
        return result if context.is_main else None  # rank 0 prints

    status, result = _run_distributed("fastdarts-eval", evaluate, device=args.device, batch_size=args.batch_size)
    if status == 0 and result is not None:
        _print_eval(result, args.checkpoint)
    return status


# The offline demo of the whole method: small enough for a few minutes on one CPU core.
# The README's main job: settings under which α measurably moves on digits within a couple of
# minutes (first order, architecture lr 0.03, no warm-up; CIFAR-10 keeps each method's own).
PIPELINE_SEARCH = dict(dataset="digits", layout="N,R,N", layers=None, channels=8, ops="darts", batch_size=64,
                       order="first", arch_lr=0.03, arch_warmup_epochs=0)
# P-DARTS' stages on digits: 8x8 images allow 3 cells (N,R,R); the search epochs are split over the stages.
PIPELINE_STAGES = "3:8,3:5,3:3"
PIPELINE_TRAIN = dict(dataset="digits", layers=8, channels=16)


def pipeline_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fastdarts-pipeline",
        description="The whole method offline on the digits data set: search a cell (layout N,R,N, C=8, batch 64, "
                    "first order, architecture lr 0.03, no architecture warm-up; p-darts: stages 3:8,3:5,3:3), "
                    "train the derived network from scratch (8 cells, C=16, otherwise the paper's recipe) and "
                    "evaluate it on the test set. For CIFAR-10 run fastdarts-search, fastdarts-train and "
                    "fastdarts-eval (see the README).",
        formatter_class=_Help)
    p.add_argument("--out", default="runs/pipeline", help="output directory (search/ and train/ inside)")
    p.add_argument("--method", default="darts", choices=list(PRESETS),
                   help="search method (its preset, with this demo's data, network size and batch)")
    p.add_argument("--search-epochs", type=_positive_int, default=6, help="(p-darts: split over its 3 stages)")
    p.add_argument("--order", choices=["first", "second"], default="first", help="architecture gradient")
    p.add_argument("--train-epochs", type=_positive_int, default=10)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def pipeline_main(argv: Sequence[str] | None = None) -> int:
    args = pipeline_parser().parse_args(argv)
    import time

    from .evaluate import evaluate_checkpoint

    out = Path(args.out)
    start = time.perf_counter()
    common = dict(device=args.device, seed=args.seed, progress=args.progress)

    def run_all():
        if out.exists() and any(out.iterdir()):
            raise FastDartsError(f"--out {out} is not empty; choose another directory")
        settings = dict(PIPELINE_SEARCH, method=args.method, epochs=args.search_epochs, order=args.order)
        if args.method == "p-darts":
            stages = PIPELINE_STAGES.count(",") + 1
            settings.update(layout=None, stages=PIPELINE_STAGES, epochs=max(1, args.search_epochs // stages))
        config = SearchConfig(**settings, out=str(out / "search"), **common).checked()
        epochs = (f"{config.epochs} epochs in each of the stages {config.stages}" if config.stages else
                  f"{config.epochs} epochs")
        print(f"== 1/3 search ({args.method}, {epochs}, {config.order} order) -> {out / 'search'}")
        searched = search(config)
        print(f"== 2/3 train the derived network from scratch ({args.train_epochs} epochs) -> {out / 'train'}")
        trained = train(TrainConfig(**PIPELINE_TRAIN, genotype=str(searched.out / "genotype.json"),
                                    epochs=args.train_epochs, out=str(out / "train"), **common))
        print(f"== 3/3 evaluate {trained.out / 'last.pt'}")
        return trained, evaluate_checkpoint(trained.out / "last.pt", device=args.device)

    status, outcome = _run("fastdarts-pipeline", run_all)
    if status:
        return status
    trained, result = outcome
    _print_eval(result, str(trained.out / "last.pt"))
    print(f"pipeline: search -> train -> eval on digits took {time.perf_counter() - start:.0f} s; "
          f"final test accuracy {result['top1']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(search_main())
