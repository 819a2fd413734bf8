"""Images per second of each data route, against a plain Pillow ``Dataset`` + ``DataLoader``, same run.

A folder of ``--images`` generated JPEGs (``--classes`` classes, ``--width`` x
``--height``, quality 90) is written once to ``--root``; then each route serves
training batches of ``--batch-size`` (random crop/flip, or random-resized crop +
flip for the JPEG routes) for ``--passes`` timed passes after one untimed pass
(which also builds the folder's cache and starts the workers):

- ``cache on device``: ``--dataset folder``'s uint8 cache at ``--image-size``, held on the device
  (``DeviceLoader``);
- ``cache streamed``: the same cache memory-mapped and gathered per batch (``StreamLoader``);
- ``jpeg, N workers``: ``--dataset imagenet``'s route (``JpegLoader``: decode, random-resized crop to
  ``--image-size``, flip) with N worker processes, without and with the colour jitter (on the device);
- ``pillow baseline, N workers``: a plain ``torch.utils.data.Dataset`` that opens each JPEG with Pillow,
  takes a random crop of the same size out of the image resized to the same size, flips it and returns
  a tensor, batched by ``DataLoader(num_workers=N)``: what a user writes without fastdarts.

The timer covers iterating the loader (every batch reaches the device as normalised float32); the
figure is images / second, the median over the timed passes. Then the data wait of a training step:
``--steps`` steps of ``train_step`` on a tiny NetworkCIFAR (3 cells, C=4, as the tests' runs) fed by
the JPEG route with 2 workers at the tests' settings (batch 8, 32x32 crops): the time the main process
blocks on the workers' next batch, and the whole time in ``next(loader)`` (plus the copy, colour jitter and
normalisation on the device), next to the step's own time; and, for scale, what taking a batch that is
already waiting costs (the same measurement after 200 ms idle). A blocked time no larger than that means
the workers keep ahead of the step.

    OMP_NUM_THREADS=1 python benchmarks/data_loader.py --json benchmarks/results_cpu_data_loader.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def write_jpegs(root: Path, images: int, classes: int, width: int, height: int) -> Path:
    """``root/train/cNN/*.jpg`` and a small ``val/``; kept between runs (same arguments, same files)."""
    marker = root / f".complete-{images}-{classes}-{width}x{height}"
    if marker.exists():
        return root
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", images), ("val", classes * 2)):
        for i in range(n):
            c = i % classes
            folder = root / split / f"c{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            # Smooth content (a gradient plus noise) compresses like a photo, not like noise.
            base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * rng.random(3, dtype=np.float32)
            pixels = np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    marker.touch()
    return root


class PillowFolder(torch.utils.data.Dataset):
    """The baseline: one Pillow decode, resize, random crop and flip per image."""

    def __init__(self, paths, labels, size: int):
        self.paths, self.labels, self.size = list(paths), list(labels), size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        rng = np.random.default_rng(i)
        with Image.open(self.paths[i]) as image:
            image = image.convert("RGB").resize((self.size + self.size // 8, self.size + self.size // 8),
                                                Image.BILINEAR)
        x, y = rng.integers(0, self.size // 8 + 1, 2)
        array = np.asarray(image)[y:y + self.size, x:x + self.size]
        if rng.random() < 0.5:
            array = array[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1), self.labels[i]


def images_per_second(make_batches, passes: int) -> float:
    rates = []
    for p in range(passes + 1):
        start, seen = time.perf_counter(), 0
        for x, _ in make_batches(p):
            seen += len(x)
        if p:  # the first pass builds caches and starts workers
            rates.append(seen / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="/tmp/fastdarts-bench-jpegs")
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--height", type=int, default=120)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="training steps of the data-wait measurement")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args(argv)

    from fastdarts.data import Loaders, load_dataset
    from fastdarts.data.jpeg_loader import JpegLoader

    device = torch.device(args.device)
    root = write_jpegs(Path(args.root), args.images, args.classes, args.width, args.height)
    S, B = args.image_size, args.batch_size
    folder = load_dataset("folder", root, image_size=S, progress=False, log=lambda _: None)
    imagenet = load_dataset("imagenet", root, image_size=S)
    rows = {}

    for name, budget in (("cache on device", None), ("cache streamed", 0)):
        loaders = Loaders(folder, (folder.train,), device, budget_mb=budget)
        loader = loaders(loaders.placed[0], B, train=True, shuffle=True)
        rows[name] = images_per_second(loader.epoch, args.passes)

    paths, labels = imagenet.train.paths, imagenet.train.labels.tolist()
    for workers in (1, 2):
        plural = "s" if workers > 1 else ""
        # Without colour jitter (the search's setting): the same work as the baseline's.
        for jitter, name in ((None, f"jpeg, {workers} worker{plural}"),
                             ((0.4, 0.4, 0.4, 0.2), f"jpeg + colour jitter, {workers} worker{plural}")):
            loader = JpegLoader(paths, labels, B, device=device, mean=imagenet.mean, std=imagenet.std, train=True,
                                image_size=S, shuffle=True, workers=workers, jitter=jitter)
            rows[name] = images_per_second(loader.epoch, args.passes)
            loader.close()
        plain = torch.utils.data.DataLoader(PillowFolder(paths, labels, S), batch_size=B, shuffle=True,
                                            num_workers=workers, persistent_workers=True,
                                            pin_memory=device.type == "cuda")
        mean = torch.tensor(imagenet.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(imagenet.std, device=device).view(1, 3, 1, 1)

        def baseline(_pass, plain=plain, mean=mean, std=std):
            for x, y in plain:
                yield (x.to(device, non_blocking=True).float().div_(255) - mean) / std, y.to(device)

        rows[f"pillow baseline, {workers} worker{plural}"] = images_per_second(baseline, args.passes)
        del plain

    wait = data_wait(imagenet, device, args)
    for name, rate in rows.items():
        print(f"{name:30s} {rate:9.0f} images/s")
    print(f"per training step (jpeg, 2 workers, batch {wait['batch']} at {wait['image_size']}px, the tests' "
          f"3-cell C=4 network): blocked on the workers median {wait['blocked_ms_median']:.2f} ms (max "
          f"{wait['blocked_ms_max']:.2f}; a batch already waiting takes {wait['ready_batch_ms_median']:.2f}); "
          f"in next() in all {wait['next_ms_median']:.2f} ms; the step {wait['step_ms_median']:.1f} ms")
    result = dict(device=str(device), cpu=platform.processor() or platform.machine(),
                  torch=torch.__version__, threads=torch.get_num_threads(), images=args.images,
                  jpeg=f"{args.width}x{args.height}", image_size=S, batch_size=B, passes=args.passes,
                  images_per_second=rows, data_wait=wait)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def data_wait(imagenet, device: torch.device, args) -> dict:
    """Time a training step waits for data on the JPEG route at the tests' settings (a 3-cell network of
    C=4, batch 8, 32x32 crops, 2 workers, colour jitter): the time blocked on the workers' next batch
    (the data wait proper) and the whole time in ``next(loader)`` (that wait plus the copy, colour jitter
    and normalisation on the device), each next to the step's own time."""
    from fastdarts.data.jpeg_loader import JpegLoader
    from fastdarts.eval_network import NetworkCIFAR
    from fastdarts.genotype import get_genotype
    from fastdarts.train_loop import train_step

    batch, side = 8, 32
    torch.manual_seed(0)
    model = NetworkCIFAR(get_genotype("DARTS_V2"), C=4, num_classes=imagenet.num_classes, layers=3,
                         auxiliary=True, image_size=side).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = JpegLoader(imagenet.train.paths, imagenet.train.labels.tolist(), batch, device=device,
                        mean=imagenet.mean, std=imagenet.std, train=True, image_size=side, shuffle=True,
                        workers=2)
    blocked = []
    make = loader._dataloader

    class Timed:  # the workers' iterator, timed: how long the main process blocks on it
        def __init__(self, inner):
            self.inner = iter(inner)

        def __next__(self):
            start = time.perf_counter()
            item = next(self.inner)
            blocked.append(time.perf_counter() - start)
            return item

    loader._dataloader = lambda: type("Wrapped", (), {"__iter__": lambda _: Timed(make())})()
    waits, steps = [], []
    batches = loader.cycle(0)
    next(batches)  # the workers start
    del blocked[:]
    for _ in range(args.steps):
        start = time.perf_counter()
        x, y = next(batches)
        waited = time.perf_counter()
        train_step(model, optimizer, x, y, auxiliary_weight=0.4, grad_clip=5.0, bf16=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        waits.append(waited - start)
        steps.append(time.perf_counter() - waited)
    blocked_in_steps = blocked[-args.steps:]
    # The same with the workers surely ahead (200 ms idle before each batch): what taking a ready batch off
    # the workers' queue costs by itself (receiving it from another process), not a wait for decoding.
    del blocked[:]
    for _ in range(10):
        time.sleep(0.2)
        next(batches)
    ready = list(blocked)
    loader.close()
    blocked = blocked_in_steps
    return dict(batch=batch, image_size=side, steps=args.steps,
                blocked_ms_median=1e3 * statistics.median(blocked), blocked_ms_max=1e3 * max(blocked),
                ready_batch_ms_median=1e3 * statistics.median(ready),
                next_ms_median=1e3 * statistics.median(waits), step_ms_median=1e3 * statistics.median(steps))

if __name__ == "__main__":
    main()
