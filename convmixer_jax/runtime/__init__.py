"""Process-level settings of the command-line entry points."""
