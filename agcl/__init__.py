"""Semi-AGCL replication kit: data, networks, methods, engine, evaluation and report."""

__version__ = "0.1.0"
