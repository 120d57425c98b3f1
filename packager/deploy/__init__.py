"""The deploy stage: manifests that run a pushed image on Kubernetes or KServe."""
