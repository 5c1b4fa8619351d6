"""`enginebuild operator`: the metrics server, then kopf with our handlers, until SIGTERM.

Several replicas are safe through kopf peering: with the KopfPeering / ClusterKopfPeering CRDs and a
peering object named ENGINEBUILD_PEERING_NAME (the chart creates both), replicas see each other and
all but the highest-priority one pause. Without the CRDs kopf runs standalone (a single replica);
ENGINEBUILD_PEERING_MANDATORY=true refuses to run that way, `--standalone` skips peering on purpose.
"""

from __future__ import annotations

import argparse
import logging
import random

import kopf
from prometheus_client import start_http_server

from .config import load_config

log = logging.getLogger("enginebuild.operator")


def main(args: argparse.Namespace) -> int:
    config = load_config()
    if getattr(args, "verbose", False):
        logging.getLogger().setLevel(logging.DEBUG)
    else:
        logging.getLogger("kopf").setLevel(logging.WARNING)
        logging.getLogger("kopf.activities.probe").setLevel(logging.ERROR)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # probes every few seconds
        # Which replica acts is operational news: keep kopf's peering decisions in the log.
        logging.getLogger("kopf._core.engines.peering").setLevel(logging.INFO)
    from . import handlers  # noqa: F401  (registers the handlers with kopf's default registry)

    server, thread = start_http_server(config.metrics_port, addr=config.bind_address)
    log.info("metrics on %s, liveness on %s", config.metrics_url, config.liveness_url)
    namespaces = list(getattr(args, "namespace", None) or [])
    clusterwide = bool(getattr(args, "all_namespaces", False)) or not namespaces
    peering_name = config.peering_name if config.peering_mandatory else None
    try:
        kopf.run(
            clusterwide=clusterwide,
            namespaces=() if clusterwide else namespaces,
            standalone=True if getattr(args, "standalone", False) else None,
            peering_name=peering_name,
            priority=config.peering_priority if config.peering_priority is not None else random.randint(1, 2**31 - 1),
            liveness_endpoint=config.liveness_url,
        )
    finally:
        server.shutdown()
    return 0
