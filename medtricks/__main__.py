"""`python -m medtricks ...` (also what torchrun launches)."""

from medtricks.cli import main

main()
