"""`python -m train [flags] [@file.args]` (see train/args.py)."""

import sys

from train.main import main

sys.exit(main())
