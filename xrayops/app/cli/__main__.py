"""`python -m xrayops.app.cli`: the same as the `xrayops` command."""
from xrayops.app.cli import main

main()
