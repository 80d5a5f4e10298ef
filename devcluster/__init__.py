"""A local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler) for tests and development, on a machine with no Docker and no internet."""
