"""Control plane of enginebuild: a kopf operator that turns EngineBuild resources into Jobs and status.

Imported as `enginebuild_operator` (the folder is `operator/`, but that name would shadow the stdlib).
"""
