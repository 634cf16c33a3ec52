"""Airflow API plugin: where every user is admin (the simple auth manager's
`simple_auth_manager_all_admins`: `make airflow-ui`, `make up`), the API answers only requests
addressed to a loopback name.

Listening on 127.0.0.1 keeps other machines out, not web pages in this machine's browser: a page
whose name its DNS re-points at 127.0.0.1 (DNS rebinding) is same-origin with the API, so it could
take an admin token from /auth/token and trigger runs. Its requests still carry the page's own name
as Host, so any other Host gets 400 here, in front of every route (/auth included), before anything
is issued. Airflow has no allowed-hosts setting of its own. Keyed on the all-admins setting, not on
the script that started it: wherever nobody logs in, and only there. The compose stack logs users
in (FAB) and is reached under whatever name it is published as, so it is left alone.
"""

from __future__ import annotations

from airflow.configuration import conf
from airflow.plugins_manager import AirflowPlugin
from starlette.middleware.trustedhost import TrustedHostMiddleware

LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "[::1]"]  # with any port: Starlette compares the name


class LocalHostGuardPlugin(AirflowPlugin):
    name = "local_host_guard"
    fastapi_root_middlewares = [
        {"name": "loopback host names only", "middleware": TrustedHostMiddleware,
         "kwargs": {"allowed_hosts": LOOPBACK_HOSTS, "www_redirect": False}},
    ] if conf.getboolean("core", "simple_auth_manager_all_admins", fallback=False) else []
