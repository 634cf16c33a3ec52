#!/bin/sh
# Writes the basic-auth config from the environment (no credentials in the image or
# the repo), then runs the server command. Anonymous requests are refused by the
# basic-auth app; authenticated users get no permission unless granted.
set -eu
: "${MLFLOW_ADMIN_USERNAME:?}" "${MLFLOW_ADMIN_PASSWORD:?}" "${MLFLOW_AUTH_DATABASE_URI:?}"
cat > "${MLFLOW_AUTH_CONFIG_PATH:-/tmp/basic_auth.ini}" <<INI
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_ADMIN_USERNAME}
admin_password = ${MLFLOW_ADMIN_PASSWORD}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
exec "$@"
