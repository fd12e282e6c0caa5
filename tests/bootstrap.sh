#!/usr/bin/env bash
# Installs what the tests and the demo need; safe to run again (does nothing when all is there).
#  - Debian packages: Dovecot (the upstream IMAP server of the tests, and its POP3 as the
#    reference; LMTP for mail delivered by Postfix), Cyrus IMAP (the second upstream server:
#    cyrus-common and sasl2-bin installed, imapd unpacked, see below), Postfix (the real MTA of
#    the submission end-to-end test), the real POP3 and SMTP clients, curl, openssl,
#    python3-venv;
#  - .venv with popgate installed editable plus its test extras.
# Runs apt-get as root (or through sudo). The distro's own Dovecot and Postfix services are kept
# from starting and left disabled (Postfix is preseeded to "No configuration"): the tests start
# private instances on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'bootstrap: %s\n' "$*" >&2; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        SUDO=(__no_sudo__)
    fi
fi

# libnet-ssleay-perl is only a Recommends of swaks, and without it swaks has no TLS; the
# install uses --no-install-recommends, so every capability a test relies on is named here and
# checked below (verify_clients). haproxy: the real load balancer of the PROXY protocol tests
# (a private instance in the foreground, tests/support/haproxy.py; its service is not used).
# systemd: only for systemd-analyze, which checks contrib/systemd/popgate.service (no service
# manager is started).
PACKAGES=(python3-venv dovecot-imapd dovecot-pop3d dovecot-lmtpd cyrus-common sasl2-bin postfix curl openssl fetchmail mpop getmail6 swaks libnet-ssleay-perl msmtp ca-certificates haproxy systemd)

installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    if [ "$pkg" = python3-venv ]; then
        # Any python3 that can create a venv with pip will do (e.g. a pyenv build).
        if python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then continue; fi
    fi
    installed "$pkg" || missing+=("$pkg")
done

stop_system_dovecot() {
    # Stop a distro Dovecot that the package scripts may have started, by its pid file,
    # and keep it from starting at boot. Private test instances never use this pid file.
    local pidfile=/run/dovecot/master.pid pid
    if [ -r "$pidfile" ]; then
        pid=$(head -n1 "$pidfile")
        if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dovecot ]; then
            log "stopping the system Dovecot (pid $pid)"
            "${SUDO[@]}" kill -TERM "$pid" || true
            for _ in $(seq 100); do
                [ -d "/proc/$pid" ] || break
                sleep 0.1
            done
        fi
    fi
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        "${SUDO[@]}" systemctl disable --now dovecot.service dovecot.socket >/dev/null 2>&1 || true
    fi
    if command -v update-rc.d >/dev/null 2>&1 && [ -e /etc/init.d/dovecot ]; then
        "${SUDO[@]}" update-rc.d dovecot disable >/dev/null 2>&1 || true
    fi
}

stop_system_postfix() {
    # The package may have started a master on port 25: stop it (by its own command, on the
    # system instance only) and keep it from starting at boot. Private test instances have
    # their own config_directory and are not touched.
    if [ -e /etc/postfix/main.cf ] && command -v postfix >/dev/null 2>&1; then
        if "${SUDO[@]}" postfix status >/dev/null 2>&1; then
            log "stopping the system Postfix"
            "${SUDO[@]}" postfix stop >/dev/null 2>&1 || true
        fi
    fi
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        "${SUDO[@]}" systemctl disable --now postfix.service >/dev/null 2>&1 || true
    fi
    if command -v update-rc.d >/dev/null 2>&1 && [ -e /etc/init.d/postfix ]; then
        "${SUDO[@]}" update-rc.d postfix disable >/dev/null 2>&1 || true
    fi
}

stop_system_cyrus() {
    # cyrus-common ships a service (its master would bind 143/110/…); the tests run private
    # instances with their own pid files, so keep the system one from starting, as Dovecot's.
    local pidfile=/run/cyrus-master.pid pid
    if [ -r "$pidfile" ]; then
        pid=$(head -n1 "$pidfile")
        if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = cyrmaster ]; then
            log "stopping the system Cyrus (pid $pid)"
            "${SUDO[@]}" kill -TERM "$pid" || true
        fi
    fi
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        "${SUDO[@]}" systemctl disable --now cyrus-imapd.service >/dev/null 2>&1 || true
    fi
    if command -v update-rc.d >/dev/null 2>&1 && [ -e /etc/init.d/cyrus-imapd ]; then
        "${SUDO[@]}" update-rc.d cyrus-imapd disable >/dev/null 2>&1 || true
    fi
}

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "${SUDO[0]:-}" = __no_sudo__ ]; then
        log "missing Debian packages: ${missing[*]}; run as root or install sudo"
        exit 1
    fi
    log "installing: ${missing[*]}"
    # Keep package scripts from starting services (Dovecot would grab 110/143/993/995).
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
        "${SUDO[@]}" chmod 755 "$policy"
        own_policy=1
    fi
    cleanup_policy() { if [ "$own_policy" = 1 ]; then "${SUDO[@]}" rm -f "$policy"; fi; }
    trap cleanup_policy EXIT
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    # Postfix asks what kind of mail server this is: none; the tests configure their own.
    echo "postfix postfix/main_mailer_type select No configuration" |
        "${SUDO[@]}" debconf-set-selections
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends "${missing[@]}" >/dev/null
    cleanup_policy
    trap - EXIT
    stop_system_dovecot
    stop_system_postfix
    stop_system_cyrus
fi

# --- podman (the container test, tests/integration/test_container.py) ---------------------------
# It builds docker/Dockerfile and runs the image: rootful podman with runc (crun 1.8 refuses
# hybrid cgroups), CNI plugins and iptables for its networks, and mmdebstrap, which makes a
# stand-in for the official Python base image where no registry can be reached.
# tests/support/container.py keeps podman's settings in a private CONTAINERS_CONF; nothing is
# written to /etc/containers.
CONTAINER_PACKAGES=(podman runc mmdebstrap containernetworking-plugins iptables)
container_missing=()
for pkg in "${CONTAINER_PACKAGES[@]}"; do
    installed "$pkg" || container_missing+=("$pkg")
done
if [ "${#container_missing[@]}" -gt 0 ]; then
    if [ "${SUDO[0]:-}" = __no_sudo__ ]; then
        log "missing Debian packages: ${container_missing[*]}; run as root or install sudo"
        exit 1
    fi
    log "installing: ${container_missing[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends "${container_missing[@]}" >/dev/null
fi

# Cyrus's imapd is in cyrus-imapd, which Conflicts with dovecot-imapd (both provide
# imap-server), so it is never installed: the package of exactly cyrus-common's version is
# downloaded and unpacked under /opt/popgate-test/cyrus, where tests/support/cyrus.py looks.
# master, ctl_cyrusdb and the libraries come from the installed cyrus-common.
CYRUS_DIR=/opt/popgate-test/cyrus
install_cyrus_imapd() {
    local version stamp="$CYRUS_DIR/.popgate-version" work deb
    version=$(dpkg-query -W -f='${Version}' cyrus-common)
    if [ -x "$CYRUS_DIR/usr/lib/cyrus/bin/imapd" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$version" ]; then
        return 0
    fi
    if [ "${SUDO[0]:-}" = __no_sudo__ ]; then
        log "cyrus-imapd is not unpacked under $CYRUS_DIR; run as root or install sudo"
        exit 1
    fi
    log "unpacking cyrus-imapd $version under $CYRUS_DIR (not installed: it conflicts with dovecot-imapd)"
    work=$(mktemp -d)
    # apt's download sandbox user must be able to write there
    chmod 777 "$work"
    if ! (cd "$work" && "${SUDO[@]}" apt-get download -q "cyrus-imapd=$version" >/dev/null 2>&1); then
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
        (cd "$work" && "${SUDO[@]}" apt-get download -q "cyrus-imapd=$version" >/dev/null)
    fi
    deb=$(ls "$work"/cyrus-imapd_*.deb)
    "${SUDO[@]}" rm -rf "$CYRUS_DIR"
    "${SUDO[@]}" mkdir -p "$CYRUS_DIR"
    "${SUDO[@]}" dpkg-deb -x "$deb" "$CYRUS_DIR"
    printf '%s\n' "$version" | "${SUDO[@]}" tee "$stamp" >/dev/null
    rm -rf "$work"
}
install_cyrus_imapd

verify_cyrus() {
    local problems=() imapd="$CYRUS_DIR/usr/lib/cyrus/bin/imapd"
    [ -x /usr/lib/cyrus/bin/master ] || problems+=("no /usr/lib/cyrus/bin/master (cyrus-common)")
    [ -x "$imapd" ] || problems+=("no $imapd")
    if [ -x "$imapd" ] && ldd "$imapd" | grep -q 'not found'; then
        problems+=("$imapd lacks libraries: $(ldd "$imapd" | grep 'not found' | tr -s ' \t\n' ' ')")
    fi
    command -v saslpasswd2 >/dev/null 2>&1 || [ -x /usr/sbin/saslpasswd2 ] ||
        problems+=("no saslpasswd2 (sasl2-bin)")
    getent passwd cyrus >/dev/null || problems+=("no cyrus user (made by cyrus-common)")
    command -v unshare >/dev/null 2>&1 || problems+=("no unshare (util-linux)")
    if [ "${#problems[@]}" -gt 0 ]; then
        for problem in "${problems[@]}"; do log "Cyrus check failed: $problem"; done
        exit 1
    fi
}
verify_cyrus

# The real clients must be able to do what the tests ask of them (TLS above all): a client that
# installed without a capability fails here, loudly, instead of as a puzzling test failure.
verify_clients() {
    local problems=() swaks_support curl_version fetchmail_version
    # Output is captured first: `cmd | grep -q` would fail under pipefail when grep stops early.
    swaks_support=$(swaks --support 2>&1 || true)
    grep -q '^=== TLS supported' <<<"$swaks_support" ||
        problems+=("swaks has no TLS (needs libnet-ssleay-perl)")
    grep -q '^=== Basic AUTH supported' <<<"$swaks_support" || problems+=("swaks has no AUTH")
    curl_version=$(curl --version)
    for proto in pop3 pop3s smtp smtps; do
        grep -q "^Protocols:.* $proto\( \|$\)" <<<"$curl_version" ||
            problems+=("curl lacks the $proto protocol")
    done
    grep -q '^Features:.* SSL\( \|$\)' <<<"$curl_version" || problems+=("curl has no TLS")
    fetchmail_version=$(fetchmail -V 2>/dev/null || true)
    grep -q '^This is fetchmail release .*+SSL' <<<"$fetchmail_version" ||
        problems+=("fetchmail has no SSL")
    for client in mpop msmtp; do
        grep -qE '^TLS/SSL library: (GnuTLS|OpenSSL|libtls)' <<<"$("$client" --version 2>&1)" ||
            problems+=("$client has no TLS library")
    done
    getmail --version >/dev/null 2>&1 || problems+=("getmail does not run")
    openssl version >/dev/null 2>&1 || problems+=("openssl does not run")
    if [ "${#problems[@]}" -gt 0 ]; then
        for problem in "${problems[@]}"; do log "client check failed: $problem"; done
        exit 1
    fi
}
verify_clients

# Python environment: .venv with popgate editable + test extras, redone when pyproject changes.
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
fi
stamp=.venv/.popgate-bootstrap
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $(.venv/bin/python -c 'import sys; print(sys.version.split()[0])')"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -x .venv/bin/popgate ]; then
    log "installing popgate and its test dependencies into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
    printf '%s\n' "$want" >"$stamp"
fi
