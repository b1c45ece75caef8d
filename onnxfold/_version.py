"""The version, alone in a module: the command line and the package both read it."""

__version__ = "0.1.0"
