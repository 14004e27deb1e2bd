"""lorafleet.scheduler."""
