#!/usr/bin/env bash
# Browse the runs of this checkout: the MLflow UI on loopback, over the default tracking store.
#   launchers/mlflow_ui.sh [port]          (then open http://127.0.0.1:<port>, default 5000)
# Set MLFLOW_TRACKING_URI to browse another store (e.g. a sweep's shared sqlite file).
set -euo pipefail
port="${1:-5000}"
store="${MLFLOW_TRACKING_URI:-sqlite:///outputs/mlflow.db}"
exec mlflow ui --host 127.0.0.1 --port "$port" --backend-store-uri "$store"
