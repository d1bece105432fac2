"""petl subpackage."""
