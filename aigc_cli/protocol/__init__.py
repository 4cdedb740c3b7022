"""The OpenAI/vLLM HTTP protocol as data: request checking and response shapes, shared by the server and the client; no HTTP framework, no torch."""
