"""tunelab subpackage."""
