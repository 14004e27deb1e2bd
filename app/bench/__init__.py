"""`lorafleet bench`: workloads (trace replay, synthetic popularities, rate phases), the open-loop
runner over gRPC or HTTP, its report tables and progress bar.

Imports nothing: each caller imports the module it needs.
"""
