"""`python -m nanochat <stage>` (and `torchrun ... -m nanochat <stage>`)."""
import sys

from nanochat.cli import main

sys.exit(main())
