"""`python -m experiments.accelerator`: see `experiments.accelerator`."""

import sys

from experiments.accelerator import main

sys.exit(main())
