"""Deployment: the Model Registry, serving and export of a run's logged model (`orchard promote`, `orchard serve`, `orchard export`)."""
