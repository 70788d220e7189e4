"""python -m lspt_kernels.bench: the lspt-bench command."""
import sys

from .cli import main

sys.exit(main())
