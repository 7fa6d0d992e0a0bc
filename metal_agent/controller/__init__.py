"""The controller: turns watched objects into running engines, published addresses and status."""
