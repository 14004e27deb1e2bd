"""The server side of `lorafleet serve`: gRPC and OpenAI-compatible HTTP APIs over one `Fleet`,
their shared validation and wire types, authentication, TLS and metrics.

Imports nothing, so that a client importing `lorafleet.serving.api_types` does not load the server.
"""
