"""Deployment: export a run's logged model to portable formats and serve it."""
