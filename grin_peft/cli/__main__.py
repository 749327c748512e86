"""`python -m grin_peft.cli`: the same as the `grin-peft` command."""

import sys

from . import main

sys.exit(main())
