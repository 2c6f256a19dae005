"""Baseline methods, one file each; every module here is imported by agcl.methods.registry."""
