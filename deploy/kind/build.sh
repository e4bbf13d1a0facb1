#!/usr/bin/env bash
# Builds the criopy kind node image from deploy/kind/Dockerfile.
#   deploy/kind/build.sh [--base IMAGE] [--tag TAG] [--wheels DIR]
#     --base    the node base (default: the Dockerfile's kindest/node)
#     --tag     the image name (default: criopy/kind-node:dev)
#     --wheels  a directory of wheels already built (criopy and all its dependencies); without it the
#               wheels are built here with `pip wheel` (needs PyPI), since the node installs offline
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
base="" tag=criopy/kind-node:dev wheels=""
while (($#)); do
  case $1 in
    --base) base=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --wheels) wheels=$(cd "$2" && pwd); shift 2 ;;
    *) echo "build.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir "$context/wheels"
if [[ -n $wheels ]]; then
  cp -l "$wheels"/*.whl "$context/wheels/" 2>/dev/null || cp "$wheels"/*.whl "$context/wheels/"
else
  "${PYTHON:-python3}" -m pip wheel -q --wheel-dir "$context/wheels" "$repo"
fi
cp -r "$repo/conf" "$context/conf"
mkdir "$context/deploy"
cp -r "$repo/deploy/install.sh" "$repo/deploy/criopy.service" "$repo/deploy/kind" "$context/deploy/"

args=(--file "$repo/deploy/kind/Dockerfile" --tag "$tag")
[[ -z $base ]] || args+=(--build-arg "BASE_IMAGE=$base")
docker build "${args[@]}" "$context"
