"""Simulator speed: cells per second for in-memory `simulate` and chunked `simulate_to_h5ad`.

    OMP_NUM_THREADS=1 python bench/simulate.py                      # 100,000 cells × 2,000 genes
    OMP_NUM_THREADS=1 python bench/simulate.py --cells 20000 --genes 1000

Goal (issue 5): 100k cells × 2,000 genes in <= 30 s on one core.
"""
import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # sibling scripts such as bench/tokenization.py must not shadow the standard library

import argparse
import os
import tempfile
import time
import tracemalloc

from scfoundation.simulate import SimConfig, random_perturbations, simulate, simulate_to_h5ad


def _config(n_cells: int, n_genes: int) -> SimConfig:
    n_tfs = max(1, n_genes // 20)
    return SimConfig(n_cells=n_cells, n_genes=n_genes, n_tfs=n_tfs, n_cell_types=8, lineage_depth=3, n_batches=3,
                     perturbations=tuple(random_perturbations(20, n_tfs, seed=0)), seed=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--chunk", type=int, default=16_384)
    args = parser.parse_args()
    config = _config(args.cells, args.genes)
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, cpus={os.cpu_count()}")

    start, cpu_start = time.perf_counter(), time.process_time()
    adata = simulate(config)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    density = adata.X.nnz / (adata.n_obs * adata.n_vars)
    print(f"simulate:          {args.cells:,} cells × {args.genes:,} genes in {seconds:6.1f} s "
          f"= {args.cells / seconds:,.0f} cells/s  (non-zero fraction {density:.3f}, "
          f"mean counts/cell {adata.X.sum() / adata.n_obs:,.0f})")
    print(f"                   process CPU time {cpu_seconds:6.1f} s (less sensitive to other load on the machine)")
    del adata

    with tempfile.TemporaryDirectory() as folder:
        tracemalloc.start()
        start = time.perf_counter()
        path = simulate_to_h5ad(config, Path(folder) / "sim.h5ad", chunk_size=args.chunk)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"simulate_to_h5ad:  {args.cells:,} cells in {seconds:6.1f} s = {args.cells / seconds:,.0f} cells/s "
              f"(chunk {args.chunk:,} cells, file {path.stat().st_size / 2**20:,.0f} MiB, "
              f"peak traced memory {peak / 2**20:,.0f} MiB; tracing slows it)")


if __name__ == "__main__":
    main()
