"""`python -m veil.cli` = `veil`."""

from veil.cli import main

main()
