"""`python -m wanlite ...` (and `torchrun --nproc_per_node N -m wanlite generate ...`): the `wanlite` command."""
import sys

from wanlite.cli import main

sys.exit(main())
