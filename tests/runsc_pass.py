"""The environment of `make test`'s second pass: the integration-level suites again, on gVisor.

    env $(python -m tests.runsc_pass) python -m pytest tests/compat tests/integration ...

prints `CORRAL_RUNTIME=runsc CORRAL_TEST_HOME=… CORRAL_TEST_BRIDGE=… CORRAL_TEST_SUBNET=…`,
derived from the first pass's CORRAL_TEST_* (or their defaults) so that the two passes, and two
developers' runs on one machine, never share a home, a bridge or a subnet. Each pass also makes
servers of its own on `<bridge>g|s|u|c` at its subnet +32/+48/+64/+96 (second octet); the gVisor
pass's subnet is the first pass's +8, so none of its subnets (+8, +56, +104) meets one of those.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from corral.testing import shifted_subnet

__all__ = ["runsc_pass_env"]

SUBNET_SHIFT = 8


def runsc_pass_env(env: Mapping[str, str]) -> dict[str, str]:
    home = env.get("CORRAL_TEST_HOME") or "/var/lib/corral-test"
    bridge = env.get("CORRAL_TEST_BRIDGE") or "crltest0"
    subnet = env.get("CORRAL_TEST_SUBNET") or "10.202.0.0/16"
    return {
        "CORRAL_RUNTIME": "runsc",
        "CORRAL_TEST_HOME": f"{home.rstrip('/')}-gvisor",
        "CORRAL_TEST_BRIDGE": bridge[:13] + "v",  # 14 characters at most: suffixes keep it under 15
        "CORRAL_TEST_SUBNET": shifted_subnet(subnet, SUBNET_SHIFT),
    }


if __name__ == "__main__":
    print(" ".join(f"{name}={value}" for name, value in runsc_pass_env(os.environ).items()))
