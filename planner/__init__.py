"""edgedi.planner."""
