"""`python -m decode_attention`: the `decode-attention` command."""

import sys

from .cli import main

sys.exit(main())
