"""The `ukc` command line: commands, rendering, the entry point and the warm process."""
