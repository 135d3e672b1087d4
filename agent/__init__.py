"""edgedi.agent."""
