"""`python -m sparsegrad.recipes ...` is the `sparsegrad` command."""
import sys

from .cli import main

sys.exit(main())
