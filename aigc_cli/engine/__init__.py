"""The engine: requests in, completions and events out; the scheduler, decoding, scoring and the engine loop. Rows and seeds are made here only."""
