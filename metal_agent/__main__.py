"""`python -m metal_agent` is the same entry point as the `metal-agent` script."""

from metal_agent.cli.main import main

main()
