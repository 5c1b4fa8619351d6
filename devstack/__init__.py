"""DEV ONLY: the local stack (a real Kubernetes control plane built from upstream, the process kubelet,
SeaweedFS, Prometheus) that the demo and the tests run on. Never installed into the product images."""
