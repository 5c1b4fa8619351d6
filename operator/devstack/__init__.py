"""DEV ONLY: the embedded local stack (emulated Kubernetes API, SeaweedFS, local Job runner).

Used by the tests and by `enginebuild demo`. Never imported on the production path: the operator
and builder must not import anything from here (a test checks it).
"""
