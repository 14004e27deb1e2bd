"""lorafleet.proto."""
