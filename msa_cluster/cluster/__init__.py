"""Bringing a cluster up and serving it: placement, ingestion, the Serve app, the `msa` CLI."""
