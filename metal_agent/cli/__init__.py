"""Command-line interface: the composition root that wires core and adapters together."""
