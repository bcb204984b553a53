#!/usr/bin/env bash
# Helm post-renderer: discards the chart's (empty) output on stdin and
# prints the kustomize overlay named by the first argument instead.
set -euo pipefail
overlay="${1:-production}"
here="$(cd "$(dirname "$0")" && pwd)"
dir="$here/../../overlays/$overlay"
[ -d "$dir" ] || { echo "post-render.sh: no overlay $overlay in manifests/overlays" >&2; exit 2; }
cat > /dev/null
exec kubectl kustomize "$dir"
