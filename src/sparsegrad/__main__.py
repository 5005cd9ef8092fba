"""`python -m sparsegrad ...` is the `sparsegrad` command."""
import sys

from .cli import main

sys.exit(main())
