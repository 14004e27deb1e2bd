"""`lorafleet demo`: the one-command local run, its calibration, settings, story check, report and plot.

Imports nothing: each caller imports the module it needs.
"""
