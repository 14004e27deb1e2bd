"""Generated stubs of lorafleet/v1/serving.proto; regenerate with proto/generate.py."""
