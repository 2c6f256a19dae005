"""What a run executes on and where it lives: devices, CPU numerics, random streams, the run folder."""
