#!/usr/bin/env bash
# Preview a pull request's policy changes by their effect on every member (docs/gitops.md).
#
#   preview.sh POLICIES_DIR OUT_DIR
#
# POLICIES_DIR is the repository's policy tree as the pull request leaves it, laid out like a
# fleet directory: one sub-directory per member (and _hub/ for the hub's Dependencies) holding
# that member's GlobalTrafficPolicies, OutlierDetections, ClientConnectionConfigs and
# Dependencies. Git is the source of truth for policies: the live ones are replaced by these.
#
# Needs FLOTILLA (the flotilla binary, default: flotilla on PATH) and HUB_KUBECONFIG (a
# kubeconfig of the hub with read access to the registration Secrets). Prints the diff; exits 0
# when nothing would change, 3 when something would, 1 on error.
set -euo pipefail
policies="${1:?usage: preview.sh POLICIES_DIR OUT_DIR}"
out="${2:?usage: preview.sh POLICIES_DIR OUT_DIR}"
flotilla="${FLOTILLA:-flotilla}"

# 1. What the fleet runs now (only what the engine reads; no Secrets).
"$flotilla" snapshot --kubeconfig "${HUB_KUBECONFIG:?}" ${FLOTILLA_NAMESPACE:+--namespace "$FLOTILLA_NAMESPACE"} "$out/before"

# 2. The same fleet with the pull request's policies instead of the live ones.
rm -rf "$out/after"
cp -r "$out/before" "$out/after"
for member in "$out/after"/*/; do
  rm -f "$member"{globaltrafficpolicies,outlierdetections,clientconnectionconfigs,dependencies}.yaml
done
cp -r "$policies"/. "$out/after/"

# 3. What would change, member by member (exit 3 if anything would).
"$flotilla" diff "$out/before" "$out/after"
