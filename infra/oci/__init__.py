"""Oracle Cloud (OCI) clusters: a Ray node provider built on the ``oci`` SDK
(``provider: type: external`` in ``infra/oci/ray_cluster.yaml``) and a preflight CLI
(``python -m infra.oci``) that checks shapes and writes the cluster's security list."""
