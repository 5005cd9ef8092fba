"""`python -m sparsegrad ...` runs the `sparsegrad` command. The command is the recipes' (the `recipes`
extra); `import sparsegrad` never loads this file."""
import sys

from sparsegrad.recipes.cli import main

sys.exit(main())
