"""The pure core: parsing, validation, argv, hashing, estimates. No I/O here."""
