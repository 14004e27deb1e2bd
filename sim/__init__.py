"""lorafleet.sim."""
