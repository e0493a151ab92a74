#!/usr/bin/env bash
# A throwaway OCI registry on 127.0.0.1 for tests and CI (`omniq publish` / `omniq pull`).
#
#   scripts/registry.sh start [STATE_DIR]    start one, print its address (127.0.0.1:PORT) on stdout
#   scripts/registry.sh stop  [STATE_DIR]    stop it (idempotent) and keep nothing running
#   scripts/registry.sh status [STATE_DIR]   print the address and exit 0 when it answers, else exit 1
#
# It runs Debian's `docker-registry` (the CNCF distribution registry, one binary) with filesystem storage
# under STATE_DIR/data, listening on a free port of 127.0.0.1 only. STATE_DIR (default
# ${OMNIQ_REGISTRY_DIR:-${TMPDIR:-/tmp}/omniq-registry}) also holds config.yml, registry.pid, registry.addr
# and registry.log. With OMNIQ_REGISTRY_HTPASSWD=FILE (bcrypt entries, `user:$2y$...`) it asks for HTTP
# basic auth. With OMNIQ_REGISTRY_OWNER_PID=PID it also stops when that process exits (a killed test session
# cannot leak it). `start` installs the package with apt-get when the binary is missing (root, or sudo without
# a password); when it cannot, it exits 3 so tests can skip with that reason.
set -euo pipefail

cmd=${1:-}
state=${2:-${OMNIQ_REGISTRY_DIR:-${TMPDIR:-/tmp}/omniq-registry}}
pidfile=$state/registry.pid
addrfile=$state/registry.addr

die() { echo "registry.sh: $1" >&2; exit "${2:-1}"; }

# True when http://ADDR/v2/ answers as a registry (200, or 401 when auth is on).
answers() {
    local host=${1%:*} port=${1##*:} line
    { exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null || return 1
    printf 'GET /v2/ HTTP/1.0\r\nHost: %s\r\n\r\n' "$1" >&3
    IFS= read -r -t 2 line <&3 || { exec 3<&-; return 1; }
    exec 3<&-
    [[ $line =~ ^HTTP/1\.[01]\ (200|401) ]]
}

running_pid() {
    [[ -f $pidfile ]] || return 1
    local pid
    pid=$(cat "$pidfile")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

ensure_binary() {
    command -v docker-registry >/dev/null 2>&1 && return 0
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null \
            || die "docker-registry is not installed and cannot be installed here (not root, no passwordless sudo); install the Debian package docker-registry" 3
        sudo=(sudo -n)
    fi
    command -v apt-get >/dev/null 2>&1 \
        || die "docker-registry is not installed and apt-get is not available to install it" 3
    echo "registry.sh: installing docker-registry with apt-get" >&2
    # The package's service must not start (it would take :5000 with auth); policy-rc.d is the Debian way.
    if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-registry >&2; then
        "${sudo[@]}" apt-get update >&2 || true
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-registry >&2 \
            || die "apt-get could not install docker-registry" 3
    fi
    command -v docker-registry >/dev/null 2>&1 || die "docker-registry still not on PATH after installing it" 3
}

free_port() {
    local port
    for _ in $(seq 50); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    die "no free port found on 127.0.0.1"
}

write_config() {
    local port=$1
    mkdir -p "$state/data"
    {
        echo "version: 0.1"
        echo "log:"
        echo "  level: warn"
        echo "  accesslog:"
        echo "    disabled: true"
        echo "storage:"
        echo "  filesystem:"
        echo "    rootdirectory: $state/data"
        echo "  delete:"
        echo "    enabled: true"
        echo "http:"
        echo "  addr: 127.0.0.1:$port"
        echo "  secret: omniq-test-$RANDOM$RANDOM"
        if [[ -n ${OMNIQ_REGISTRY_HTPASSWD:-} ]]; then
            echo "auth:"
            echo "  htpasswd:"
            echo "    realm: omniq-test"
            echo "    path: $OMNIQ_REGISTRY_HTPASSWD"
        fi
    } >"$state/config.yml"
}

start() {
    mkdir -p "$state"
    if pid=$(running_pid) && [[ -f $addrfile ]] && answers "$(cat "$addrfile")"; then
        cat "$addrfile"
        return 0
    fi
    ensure_binary
    local port addr pid
    for _ in 1 2 3; do
        port=$(free_port)
        addr=127.0.0.1:$port
        write_config "$port"
        setsid docker-registry serve "$state/config.yml" >"$state/registry.log" 2>&1 </dev/null &
        pid=$!
        echo "$pid" >"$pidfile"
        for _ in $(seq 100); do
            if answers "$addr"; then
                echo "$addr" >"$addrfile"
                if [[ -n ${OMNIQ_REGISTRY_OWNER_PID:-} ]]; then
                    # stop the registry when its owner (a test session) dies without calling `stop`
                    setsid bash -c 'while kill -0 "$1" 2>/dev/null && kill -0 "$2" 2>/dev/null; do sleep 1; done
                                    kill "$2" 2>/dev/null' _ "$OMNIQ_REGISTRY_OWNER_PID" "$pid" \
                        >/dev/null 2>&1 </dev/null &
                fi
                echo "$addr"
                return 0
            fi
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
    die "docker-registry did not answer on 127.0.0.1; see $state/registry.log: $(tail -n 3 "$state/registry.log" 2>/dev/null | tr '\n' ' ')"
}

stop() {
    local pid
    if pid=$(running_pid); then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile" "$addrfile"
}

case $cmd in
    start) start ;;
    stop) stop ;;
    status)
        if running_pid >/dev/null && [[ -f $addrfile ]] && answers "$(cat "$addrfile")"; then
            cat "$addrfile"
        else
            exit 1
        fi
        ;;
    *) die "usage: scripts/registry.sh start|stop|status [STATE_DIR]" 2 ;;
esac
