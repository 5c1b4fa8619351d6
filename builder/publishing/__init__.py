"""What each Job publishes and how an engine Job gets the export half back (upload.py), and the
Triton model repository view (triton.py). The S3 layout and manifests are the contract's
(enginebuild_contract.layout). Run as stages by stages/upload.py."""
