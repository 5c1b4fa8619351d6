"""The composition root of the user-facing `enginebuild` command: the data plane's subcommands
(enginebuild_builder.cli: `build`, `trtexec-report`) beside the control plane's
(enginebuild_operator.cli: `operator`). The only package that may import both planes
(tests/test_import_direction.py); neither plane imports it."""
