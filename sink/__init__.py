"""spamsink: a memory hole for spam."""

__version__ = "0.1.0"
