"""The composition root: settings, construction in dependency order, and the run phases."""
