"""Moved: the step microbenchmark is `lspt-bench step` (lspt_kernels/bench/step.py).

    python bench/step_microbench.py [options]   ==   lspt-bench step [options]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from lspt_kernels.bench.step import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
