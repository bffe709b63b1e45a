"""The configuration: the schema, the checks registry, the error lines, and config files by name."""
