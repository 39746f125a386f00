"""Hydra config files (``config.yaml``, ``model/*.yaml``) and their typed schema (``schema.py``)."""
