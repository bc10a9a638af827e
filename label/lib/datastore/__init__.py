"""Datastores."""
