#!/bin/sh
# Build the project's vcsim (govmomi's vSphere simulator + our extensions) offline from Debian packages.
# Prints the path of the binary. Idempotent: skips the build when the binary is newer than all Go sources.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
src="$here/vcsim"
build="$here/.build"
out="$build/vcsim"
govmomi=/usr/share/gocode/src/github.com/vmware/govmomi

need=""
for pkg in golang-go golang-github-vmware-govmomi-dev; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        need="$need $pkg"
    fi
done
if [ -n "$need" ]; then
    echo "build-vcsim: installing$need" >&2
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >&2; then
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >&2
    fi
fi

mkdir -p "$build"
if [ -x "$out" ] && [ ! "$here/build-vcsim.sh" -nt "$out" ] \
    && [ -z "$(find "$src" -name '*.go' -newer "$out" | head -n 1)" ]; then
    echo "$out"
    exit 0
fi

# -overlay adds our extension files to govmomi's simulator package without copying it.
overlay="$build/overlay.json"
{
    printf '{"Replace": {'
    sep=""
    for f in "$src"/ext/*.go; do
        printf '%s"%s/simulator/zz_%s": "%s"' "$sep" "$govmomi" "$(basename "$f")" "$f"
        sep=", "
    done
    printf '}}\n'
} > "$overlay"

mkdir -p "$build/gopath" "$build/gocache"
(
    cd "$src"
    GO111MODULE=off GOPROXY=off GOFLAGS= GOTOOLCHAIN=local CGO_ENABLED=0 \
        GOPATH="$build/gopath:/usr/share/gocode" GOCACHE="$build/gocache" \
        go build -overlay "$overlay" -o "$out.tmp" .
)
mv "$out.tmp" "$out"
echo "$out"
