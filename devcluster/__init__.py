"""A local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) for tests
and development, on a machine with no Docker and no internet."""
