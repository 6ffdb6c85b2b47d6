#!/usr/bin/env bash
# Run the polyvol CSI plugin in the foreground with the embedded defaults (all roles,
# local-ephemeral as the default class). Extra arguments are passed to `polyvol plugin`;
# coming later on the command line they override the defaults (except --publish-root,
# which is repeatable and adds a root):
#   scripts/run-plugin.sh --log-level debug --node-id node-a
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO/scripts/setup.sh"

exec "$REPO/.venv/bin/polyvol" plugin \
    --endpoint unix:///run/polyvol/csi.sock \
    --node-id "$(hostname)" \
    --state-dir /var/lib/polyvol \
    --role all \
    --default-type local-ephemeral \
    --publish-root /var/lib/polyvol-demo/mnt \
    "$@"
