"""The `petl` command-line application (installed as petl.cli)."""
