"""Published petl recipes (YAML), installed as package data under petl.recipes."""
