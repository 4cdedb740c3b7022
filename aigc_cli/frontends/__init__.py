"""Front ends: the CLI (one module per command), the HTTP server, the CLI's server client and the Ray backend."""
