"""KFP pipeline definitions and how they compile and run (kfp.local or a cluster)."""
