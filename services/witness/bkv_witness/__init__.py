"""The witness: countersigns validation bundles that extend its own log."""
