"""``python -m sendense_nbd`` is ``sendense-nbd``."""

from sendense_nbd.cli.nbd import main

main()
