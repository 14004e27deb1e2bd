"""Talking to a lorafleet server: the gRPC clients, the flags client commands share, and the lean
SSE client the load generator's HTTP mode uses.

Imports nothing: each caller imports the module it needs.
"""
