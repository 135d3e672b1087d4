"""edgedi.broker."""
