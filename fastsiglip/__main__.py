"""`python -m fastsiglip ...` and `torchrun --nproc-per-node N -m fastsiglip train ...`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
