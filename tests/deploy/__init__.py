"""Tests of orchard.deploy."""
