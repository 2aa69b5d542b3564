"""Read speed of the native fast paths against rosettasciio's lazy dask arrays (Merlin .mib, EMPAD).

    python bench/readers.py [--frames 4096] [--size 256]

Writes a Merlin .mib (12-bit frames) and an EMPAD .raw + .xml of ``--frames`` frames in a
temporary folder, then times reading them in chunks of 256 frames (what ingest does) through
(a) ptycore's reader (a numpy memmap of the frame records, rosettasciio parses the header) and
(b) indexing the dask array that rosettasciio's ``file_reader(lazy=True)`` returns. Best of 3,
warm page cache (the file was just written), so it measures the reader, not the disk.

Measured on the 2-core development machine (4096 frames; Merlin 256 x 256, EMPAD 128 x 130):

    merlin-mib   native memmap 0.45 s   rosettasciio dask 1.32 s   (2.9x)
    empad        native memmap 0.05 s   rosettasciio dask 0.32 s   (6.4x)

so ptycore reads the frames natively and takes the header from rosettasciio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def best_of(fn, repeat=3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def chunked(read, n, chunk=256):
    for start in range(0, n, chunk):
        np.array(read(start, min(n, start + chunk)), np.float32, copy=True)  # touch every byte


def main() -> int:
    from test_formats import write_empad, write_mib

    from ptycore.data.readers import open_patterns

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=4096)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    nx = int(np.sqrt(args.frames))
    scan = (args.frames // nx, nx)
    n = scan[0] * scan[1]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        mib = write_mib(tmp / "scan.mib", rng.integers(0, 4096, (n, args.size, args.size), dtype=np.uint16), scan)
        empad = tmp / "empad"
        empad.mkdir()
        _, xml, _ = write_empad(empad, *scan)
        from rsciio.empad import file_reader as empad_reader
        from rsciio.quantumdetector import file_reader as mib_reader

        for name, spec, library in [("merlin-mib", mib, lambda: mib_reader(str(mib), lazy=True)[0]["data"]),
                                    ("empad", xml, lambda: empad_reader(str(xml), lazy=True)[0]["data"])]:
            with open_patterns(spec) as src:
                native = best_of(lambda src=src: chunked(src.frames.read, n))
            dask_array = library().reshape((n,) + library().shape[-2:])
            dask = best_of(lambda d=dask_array: chunked(lambda a, b: d[a:b].compute(), n))
            print(f"{name:12s} native memmap {native:.2f} s   rosettasciio dask {dask:.2f} s   "
                  f"({dask / native:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
