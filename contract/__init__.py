"""The contract between the two planes: what the operator (control plane) and the builder (data
plane) both speak. The EngineBuild spec and status, report.json and its schema version, the error
kinds and exit codes, the S3 layout and manifests, references, the build key and the constants.

Both planes import this package; it imports neither (tests/test_import_direction.py)."""
