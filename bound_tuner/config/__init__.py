"""Configuration: the spec schema, the fixed settings, search spaces and the values a study may optimize."""
