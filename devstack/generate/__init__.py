"""DEV ONLY: generators of committed files from the contract's models (the CRD, docs/spec.md,
docs/errors.md). Each module has one job: `render()` returns the text and `TARGETS` names the
checkout files it must equal (a test compares). `enginebuild-dev <name> --write` rewrites them."""
