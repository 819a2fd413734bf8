"""Time of one training epoch of the evaluation network at the paper's setting.

SPEC §4: DARTS_V2, 20 cells, C=36, batch 96, auxiliary head (weight 0.4),
drop path, cutout 16, SGD with momentum and weight decay, gradient clipping.
The script runs ``--steps`` real training steps (``train_loop.train_step``,
the code ``fastdarts-train`` runs) after ``--warmup`` more, on random images
of CIFAR-10's shape (3x32x32 uint8, 10 classes) that go through the same
device-side augmentation as CIFAR-10 (crop with padding 4, flip, cutout 16).
Random pixels are fine for timing: the cost of a step does not depend on the
values. The timer covers ``train_step`` only (forward, backward, clip, SGD
step, with a device synchronisation on both sides): building the batch (the
loader's crop, flip, cutout and normalisation) and the channels-last copy of
the input happen before the timer starts, so they are not in the figure. The
epoch time is the median step time x ceil(50000 / batch) steps; it also
leaves out the per-epoch test pass (10000 images, forward only).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/train_epoch.py --device cpu --steps 3 --warmup 1
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch

CIFAR10_TRAIN = 50_000


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--genotype", default="DARTS_V2")
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--channels", type=int, default=36)
    p.add_argument("--batch-size", type=int, default=96)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--drop-path-prob", type=float, default=0.1, help="0.2 ramps up linearly: 0.1 is mid-training")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args(argv)

    from fastdarts.data import CIFAR10_MEAN, CIFAR10_STD, DeviceLoader, ImageSet
    from fastdarts.eval_network import NetworkCIFAR, count_parameters
    from fastdarts.genotype import get_genotype
    from fastdarts.train_loop import train_step

    device = torch.device(args.device)
    torch.manual_seed(0)
    n = args.batch_size * (args.steps + args.warmup)
    images = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (n,)))
    loader = DeviceLoader(images, args.batch_size, device=device, mean=CIFAR10_MEAN, std=CIFAR10_STD, shuffle=True,
                          crop_padding=4, flip=True, cutout=16, seed=0, drop_last=True)
    model = NetworkCIFAR(get_genotype(args.genotype), C=args.channels, num_classes=10, layers=args.layers,
                         auxiliary=True).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    model.drop_path_prob = args.drop_path_prob
    optimizer = torch.optim.SGD(model.parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for step, (x, y) in enumerate(loader.epoch(0)):
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        sync()
        start = time.perf_counter()
        train_step(model, optimizer, x, y, auxiliary_weight=0.4, grad_clip=5.0, bf16=args.bf16)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    steps_per_epoch = math.ceil(CIFAR10_TRAIN / args.batch_size)
    result = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, threads=torch.get_num_threads(), genotype=args.genotype, layers=args.layers,
        channels=args.channels, batch_size=args.batch_size, parameters=count_parameters(model),
        bf16=args.bf16, channels_last=args.channels_last, step_times_s=times, step_s=step_s,
        images_per_s=args.batch_size / step_s, steps_per_epoch=steps_per_epoch, epoch_s=step_s * steps_per_epoch)
    print(f"{args.genotype} C={args.channels} {args.layers} cells batch {args.batch_size} on {args.device} "
          f"({result['threads']} thread(s)), bf16 {args.bf16}, channels-last {args.channels_last}")
    print(f"step {step_s:.3f} s (median of {len(times)}: {', '.join(f'{t:.3f}' for t in times)}), "
          f"{result['images_per_s']:.1f} img/s")
    print(f"one epoch of the 50000 CIFAR-10 training images = {steps_per_epoch} steps = {result['epoch_s']:.0f} s "
          f"({result['epoch_s'] / 3600:.2f} h), training steps only")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
