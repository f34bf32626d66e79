"""Deployment: the Model Registry, model export and serving (`orchard promote`, `orchard serve`)."""
