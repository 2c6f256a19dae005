"""Semi-AGCL, the method of this kit, in one place: the method (method.py: BCP's copy-paste
teacher plus the affinity-graph-guided contrastive terms), its losses (losses.py: Eqs 1-8) and
the patch geometry checks (geometry.py). Importing the package registers `semi_agcl`."""

from agcl.methods.semi_agcl.method import SemiAGCL

__all__ = ["SemiAGCL"]
