"""The `aigc` command line: one module per command, shared options, rendering and the one error boundary."""
