"""S3 for both planes: URIs (uri), configuration from the environment (config), error mapping
(errors) and the verified store (store). Digests are enginebuild_contract.digests; the layout of a
build under its prefix is enginebuild_contract.layout."""
