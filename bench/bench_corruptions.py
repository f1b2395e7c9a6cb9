"""Cost of generating corrupted test sets: every corruption x severity on the CIFAR-10 test split.

Times ``normlab.data.corruptions.corrupt`` (batched generation, no cache) for each of the 15 corruptions at
severities 1-5 on the 10,000 CIFAR-10 test images (the JPEG tarball in ../shared/data, or generated
image-like pictures of the same shape when it is absent), and the cost of reading one cached set back
(``corrupted_set`` on a warm cache). Prints seconds per corruption (all five severities) and the total,
which is what one data set costs once: a study's runs reuse the cached sets.

    python bench/bench_corruptions.py                # 10,000 images, 15 x 5 sets (minutes on 2 cores)
    python bench/bench_corruptions.py --quick        # 200 images, severities 1 and 5: a smoke test
    python bench/bench_corruptions.py --threads 1 --images 2000 --corruptions glass_blur,motion_blur
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
TARBALL = HERE.parent.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def test_images(n: int):
    """The first ``n`` CIFAR-10 test images (uint8, N x 3 x 32 x 32), or image-like stand-ins."""
    import numpy as np
    import torch

    if TARBALL.exists():
        from normlab.config import make_config
        from normlab.data import load_data

        b = load_data(make_config({"dataset": "cifar10", "data_root": str(TARBALL), "progress": "off"}, {}))
        x = b.test_x
        return x[:n].contiguous() if n < len(x) else x, "cifar10 test split"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 32
    base = 0.5 + 0.3 * np.sin(3 * rng.uniform(-1, 1, (n, 3, 1, 1)) * xx + 3 * rng.uniform(-1, 1, (n, 3, 1, 1)) * yy)
    arr = np.clip((base + rng.normal(0, 0.05, base.shape)) * 255, 0, 255).astype(np.uint8)
    return torch.from_numpy(arr), "generated stand-ins (no CIFAR-10 tarball)"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--severities", default="1,2,3,4,5")
    ap.add_argument("--corruptions", default="", help="comma-separated names (default: all 15)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="200 images, severities 1 and 5")
    ap.add_argument("--out", default="corruptions.json", help="file name under bench/results/ ('' = do not write)")
    args = ap.parse_args(argv)

    import torch

    from _common import RESULTS, machine
    from normlab.data import corruptions as C

    if args.threads:
        torch.set_num_threads(args.threads)
    n = 200 if args.quick else args.images
    severities = [1, 5] if args.quick else [int(s) for s in args.severities.split(",")]
    names = [s for s in args.corruptions.split(",") if s] or list(C.CORRUPTIONS)
    for name in names:
        C._check(name, 1)
    x, source = test_images(n)
    print(f"{len(x)} images {tuple(x.shape[1:])} ({source}), severities {severities}, "
          f"{torch.get_num_threads()} torch threads", flush=True)

    rows = {}
    total = 0.0
    for name in names:
        per = {}
        for s in severities:
            t0 = time.perf_counter()
            C.corrupt(x, name, s, seed=0)
            per[s] = time.perf_counter() - t0
        rows[name] = per
        total += sum(per.values())
        print(f"{name:18s} {sum(per.values()):8.2f} s   " + "  ".join(f"s{s} {v:6.2f}" for s, v in per.items()),
              flush=True)
    print(f"{'total':18s} {total:8.2f} s  ({len(names)} corruptions x {len(severities)} severities, "
          f"{len(x)} images)")

    # reading a cached set back (what every run after the first one pays)
    with tempfile.TemporaryDirectory() as tmp:
        key = C.fingerprint(x)
        C.corrupted_set(x, "contrast", 1, cache_dir=tmp, key=key)
        t0 = time.perf_counter()
        C.corrupted_set(x, "contrast", 1, cache_dir=tmp, key=key)
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        C.fingerprint(x)
        fp = time.perf_counter() - t0
    print(f"cache: read one set back {load * 1000:.1f} ms, fingerprint of the images {fp * 1000:.1f} ms")

    if args.out and not args.quick:
        RESULTS.mkdir(exist_ok=True)
        out = {"machine": machine(), "images": len(x), "source": source, "severities": severities,
               "seconds": rows, "total_seconds": total, "cache_read_seconds": load, "fingerprint_seconds": fp}
        (RESULTS / args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {RESULTS / args.out}")


if __name__ == "__main__":
    main()
