"""GCP tooling for ``ray up ray_cluster.yaml``: the preflight CLI (``python -m infra.gcp``)."""
