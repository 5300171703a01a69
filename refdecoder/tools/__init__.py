"""Maintenance tools for the repository (not needed to use the library): ``python -m refdecoder.tools.check_docs``."""
