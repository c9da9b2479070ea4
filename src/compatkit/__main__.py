"""``python -m compatkit`` runs the CLI (also under ``torchrun``)."""

from compatkit.cli import main

main()
