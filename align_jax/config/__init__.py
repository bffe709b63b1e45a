"""The configuration: the schema of every key with its default, and config files by name."""
