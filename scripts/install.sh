#!/bin/sh
# restic-manager agent installer for Linux (amd64, arm64).
#
#   curl -fsSL https://SERVER/install/install.sh | RM_ENROLL_TOKEN=TOKEN sh -s
#   curl -fsSL https://SERVER/install/install.sh | sh -s -- --token TOKEN   (the token shows in ps while it runs)
#
# A server with a self-signed certificate: check its key with the pin it prints (curl checks a pin even with -k):
#   curl -fsSL --pinnedpubkey sha256//PIN -k https://SERVER/install/install.sh | RM_ENROLL_TOKEN=TOKEN sh -s -- --pin sha256//PIN
#
# Downloads the agent the server serves for this host by the SHA-256 the server publishes for it
# (/agent/blobs/sha256/<sha256>, a URL any HTTP cache may keep; by name if that fails), verifies it against that
# checksum, installs it atomically, enrolls it with the token and starts the systemd service. With --with-restic it also
# installs the server's restic for this host the same way, as restic-manager-restic beside the agent (the agent's
# managed restic; a restic already on PATH is never touched). Safe to re-run: an up-to-date
# binary is not downloaded again and an enrolled host is not enrolled twice.
#
# Credentials: the enrollment token goes to the server in an Authorization header on every download (servers started
# with --require-download-auth need it) and to the agent through its environment; it is never put on the command
# line of a process this script starts (curl reads it from a config file in a private temporary directory).
# An https server is only ever talked to over https: curl is limited to https, for redirects too, an http --server
# is refused when this script was served with an https URL, and the agent enrolls with exactly the URL used here.
#
# The whole script is one { ... } block: the shell must read it to the closing brace on the last line before it
# runs anything, so a download cut short anywhere is a syntax error that executes nothing (a cut that merely ended
# the file after "main" would otherwise run main without its arguments).
{

# The server replaces the value below with its public URL when it serves this file. The value it inserts contains
# only URL characters ([A-Za-z0-9._~:/?#[]@!$&'()*+,;=%-] minus quotes and shell metacharacters), so it cannot
# leave the single quotes.
RM_DEFAULT_SERVER='__RM_SERVER_URL__'

say() {
    printf 'restic-manager install: %s\n' "$*" >&2
}

die() {
    say "error: $*"
    exit 1
}

usage() {
    cat >&2 <<'EOF'
usage: install.sh [options]
  --server URL    restic-manager server URL (default: the server this script came from)
  --token TOKEN   enrollment token; prefer RM_ENROLL_TOKEN=TOKEN (a command-line argument shows in ps).
                  Without one the agent is installed but not enrolled; with one it is also sent with every
                  download (servers started with --require-download-auth need that)
  --prefix DIR    install as DIR/bin/restic-manager-agent (default /usr/local); the identity goes to
                  DIR/etc/restic-manager/agent.json (/etc/restic-manager for /usr/local, /usr and /), where the
                  agent looks for it by default
  --with-restic   also install the restic the server serves for this host as DIR/bin/restic-manager-restic
                  (verified against the server's SHA256SUMS and smoke-run like the agent; also RM_WITH_RESTIC=1).
                  The agent uses the newer of it and a restic on PATH; the one on PATH is never replaced.
                  Done last; a failure (e.g. a host without glibc >= 2.34 for Debian's build) only warns
  --no-service    do not install or start the systemd service
  --dry-run       print the plan (download, enrollment, service, with their paths), change nothing
  --cacert FILE   trust this CA bundle for the server's TLS certificate
  --insecure      do not verify the server's TLS certificate (testing only)
  --pin PIN       trust the https server whose certificate has this key: sha256//<44 characters of base64>, as
                  the server prints it (also RM_PIN). Every download checks it (needs curl) and the agent keeps
                  the pinned certificate as its only root
  --allow-plain-http  let the agent talk to a plain http:// server that is not on this host (a trusted network
                  only: the token, the agent's credential and its updates cross it unencrypted; also
                  RM_ALLOW_PLAIN_HTTP=1)
  -h, --help      this help
EOF
}

# run CMD...: runs a command, or prints it under --dry-run.
run() {
    if [ "$dry_run" = 1 ]; then
        say "would run: $*"
    else
        "$@"
    fi
}

parse_args() {
    server=""
    token="${RM_ENROLL_TOKEN:-}"
    prefix="/usr/local"
    no_service=0
    dry_run=0
    cacert=""
    insecure=0
    pin="${RM_PIN:-}"
    allow_plain_http=0
    case "${RM_ALLOW_PLAIN_HTTP:-}" in 1 | true | yes) allow_plain_http=1 ;; esac
    with_restic=0
    case "${RM_WITH_RESTIC:-}" in 1 | true | yes) with_restic=1 ;; esac
    while [ $# -gt 0 ]; do
        case "$1" in
            --server) [ $# -ge 2 ] || die "--server needs a value"; server=$2; shift 2 ;;
            --server=*) server=${1#*=}; shift ;;
            --token) [ $# -ge 2 ] || die "--token needs a value"; token=$2; shift 2 ;;
            --token=*) token=${1#*=}; shift ;;
            --prefix) [ $# -ge 2 ] || die "--prefix needs a value"; prefix=$2; shift 2 ;;
            --prefix=*) prefix=${1#*=}; shift ;;
            --cacert) [ $# -ge 2 ] || die "--cacert needs a value"; cacert=$2; shift 2 ;;
            --cacert=*) cacert=${1#*=}; shift ;;
            --pin) [ $# -ge 2 ] || die "--pin needs a value"; pin=$2; shift 2 ;;
            --pin=*) pin=${1#*=}; shift ;;
            --no-service) no_service=1; shift ;;
            --with-restic) with_restic=1; shift ;;
            --dry-run) dry_run=1; shift ;;
            --insecure) insecure=1; shift ;;
            --allow-plain-http) allow_plain_http=1; shift ;;
            -h | --help) usage; exit 0 ;;
            *) usage; die "unknown option: $1" ;;
        esac
    done
}

# check_pin: a pin is sha256// and the base64 of 32 bytes (43 characters and one "="), checked before any request.
check_pin() {
    [ -n "$pin" ] || return 0
    pin_b64=${pin#sha256//}
    case "$pin" in
        sha256//*) ;;
        *) die "--pin $pin is not a pin: expected sha256// followed by 44 characters of base64" ;;
    esac
    case "$pin_b64" in
        *[!A-Za-z0-9+/=]* | *=*=* | *[!=]) die "--pin $pin is not a pin: expected sha256// followed by 44 characters of base64" ;;
    esac
    [ ${#pin_b64} -eq 44 ] || die "--pin $pin is not a pin: expected sha256// followed by 44 characters of base64"
    case "$server" in
        https://*) ;;
        *) die "--pin needs an https:// server (got $server)" ;;
    esac
    [ "$insecure" = 0 ] || die "--pin and --insecure exclude each other: a pin is verification"
    [ -z "$cacert" ] || die "--pin and --cacert exclude each other: the pinned certificate is the only root"
}

resolve_server() {
    if [ -z "$server" ]; then
        case "$RM_DEFAULT_SERVER" in
            __RM_SERVER*) die "no server URL known: pass --server https://YOUR-SERVER" ;;
            *) server=$RM_DEFAULT_SERVER ;;
        esac
    fi
    server=${server%/}
    case "$server" in
        http://?* | https://?*) ;;
        *) die "server URL must start with http:// or https://: $server" ;;
    esac
    case "$server" in
        *[!A-Za-z0-9._~:/%@\[\]-]*) die "server URL contains unexpected characters: $server" ;;
    esac
    # Served over https, this script never falls back to plain http: that would expose the token and the binary.
    case "$RM_DEFAULT_SERVER:$server" in
        https://*:http://*) die "refusing to downgrade to http: this script came from $RM_DEFAULT_SERVER; use --server https://..." ;;
    esac
    case "$token" in
        *[!A-Za-z0-9._~+/=-]*) die "the enrollment token contains unexpected characters" ;;
    esac
    if [ -n "$cacert" ] && [ ! -r "$cacert" ]; then
        die "cannot read the CA bundle $cacert"
    fi
    check_pin
}

detect_platform() {
    os_name=$(uname -s 2>/dev/null || echo unknown)
    arch_name=$(uname -m 2>/dev/null || echo unknown)
    case "$os_name" in
        Linux) os=linux ;;
        *) die "unsupported operating system '$os_name'; supported: Linux (amd64, arm64); on Windows use install.ps1" ;;
    esac
    case "$arch_name" in
        x86_64 | amd64) arch=amd64 ;;
        aarch64 | arm64) arch=arm64 ;;
        *) die "unsupported architecture '$arch_name'; supported: x86_64/amd64 and aarch64/arm64" ;;
    esac
    file="restic-manager-agent-$os-$arch"
    restic_file="restic-$os-$arch"
}

pick_tools() {
    if command -v curl >/dev/null 2>&1; then
        downloader=curl
    elif command -v wget >/dev/null 2>&1; then
        [ -z "$pin" ] || die "--pin needs curl: wget cannot check a public key pin"
        downloader=wget
        # Only GNU Wget can take the token from a file (WGETRC) and refuse redirects; BusyBox wget cannot.
        if ! wget --version 2>/dev/null | grep -q 'GNU Wget'; then
            case "$server" in
                https://*) die "this wget cannot be kept from following redirects to http: install curl" ;;
            esac
            [ -z "$token" ] || die "this wget can only take the token on its command line, visible to every user: install curl"
            downloader=busybox-wget
        fi
    else
        die "neither curl nor wget is installed"
    fi
    if command -v sha256sum >/dev/null 2>&1; then
        hasher=sha256sum
    elif command -v shasum >/dev/null 2>&1; then
        hasher=shasum
    elif command -v openssl >/dev/null 2>&1; then
        hasher=openssl
    else
        die "no SHA-256 tool found (sha256sum, shasum or openssl)"
    fi
}

# write_auth: with a token, the files curl and wget read it from (never their command lines), in the private $work.
write_auth() {
    [ -n "$token" ] || return 0
    auth_umask=$(umask)
    umask 077
    printf 'header = "Authorization: Bearer %s"\n' "$token" >"$work/curl.conf" || die "cannot write $work/curl.conf"
    printf 'header = Authorization: Bearer %s\n' "$token" >"$work/wgetrc" || die "cannot write $work/wgetrc"
    umask "$auth_umask"
}

# fetch URL FILE: downloads to FILE; fails on HTTP errors and on interrupted transfers. With a token, sends it as a
# bearer header read from a file. From an https server only https is allowed, redirects included.
# (POSIX sh has no local variables: the names here are prefixed so they cannot clobber the caller's.)
fetch() {
    fetch_url=$1 fetch_out=$2
    case "$fetch_url" in
        https://*) ;;
        http://*) case "$server" in https://*) die "refusing to fetch $fetch_url over http from an https server" ;; esac ;;
        *) die "refusing to fetch $fetch_url" ;;
    esac
    case "$downloader" in
        curl)
            case "$server" in
                https://*) set -- --proto '=https' --proto-redir '=https' ;;
                *) set -- --proto '=http,https' --proto-redir '=http,https' ;;
            esac
            if [ -n "$token" ]; then set -- "$@" --config "$work/curl.conf"; fi
            if [ -n "$cacert" ]; then set -- "$@" --cacert "$cacert"; fi
            if [ "$insecure" = 1 ]; then set -- "$@" --insecure; fi
            # The pin replaces certificate verification: curl checks the key even with --insecure.
            if [ -n "$pin" ]; then set -- "$@" --pinnedpubkey "$pin" --insecure; fi
            curl -fsSL "$@" --retry 2 --connect-timeout 10 -o "$fetch_out" "$fetch_url"
            ;;
        wget | busybox-wget)
            set --
            # GNU Wget would send the header to wherever a redirect points: no redirects (the server sends none).
            if [ "$downloader" = wget ]; then set -- --max-redirect=0; fi
            if [ -n "$cacert" ]; then set -- "$@" --ca-certificate="$cacert"; fi
            if [ "$insecure" = 1 ]; then set -- "$@" --no-check-certificate; fi
            if [ -n "$token" ]; then
                WGETRC="$work/wgetrc" wget -q -T 10 "$@" -O "$fetch_out" "$fetch_url"
            else
                wget -q -T 10 "$@" -O "$fetch_out" "$fetch_url"
            fi
            ;;
    esac
}

# fetch_by_digest BLOB_URL NAME_URL FILE: downloads by digest (a URL that only ever serves the bytes with that
# SHA-256, so a cache in between can never hand out another build under it), else by name (a server from before
# content-addressed downloads, or a file replaced since SHA256SUMS was read). The caller checks the digest either way.
fetch_by_digest() {
    if fetch "$1" "$3"; then return 0; fi
    say "could not download $1; downloading $2 instead"
    fetch "$2" "$3"
}

# sha256_of FILE: prints the lowercase hex digest.
sha256_of() {
    case "$hasher" in
        sha256sum) sha256sum "$1" | cut -d' ' -f1 ;;
        shasum) shasum -a 256 "$1" | cut -d' ' -f1 ;;
        openssl) openssl dgst -sha256 "$1" | sed 's/^.*= *//' ;;
    esac
}

check_permissions() {
    # The agent derives its default config path from where it is installed by the same rule
    # (rm_agent::config::default_path_for): keep the two in step.
    while [ "$prefix" != / ] && [ "${prefix%/}" != "$prefix" ]; do prefix=${prefix%/}; done
    bin_dir="${prefix%/}/bin"
    dest="$bin_dir/restic-manager-agent"
    restic_dest="$bin_dir/restic-manager-restic"
    case "$prefix" in
        / | /usr/local | /usr) config_dir=/etc/restic-manager ;;
        *) config_dir="$prefix/etc/restic-manager" ;;
    esac
    config="$config_dir/agent.json"
    [ "$dry_run" = 1 ] && return 0
    probe=$prefix
    while [ ! -d "$probe" ]; do probe=$(dirname "$probe"); done
    if [ ! -w "$probe" ] || { [ -d "$bin_dir" ] && [ ! -w "$bin_dir" ]; }; then
        die "installing into $prefix needs write access to $probe: re-run as root (sudo sh) or pass --prefix"
    fi
    if [ "$no_service" = 0 ] && has_systemd && [ "$(id -u)" != 0 ]; then
        die "installing the systemd service needs root: re-run as root, or pass --no-service"
    fi
}

has_systemd() {
    command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]
}

expected_checksum() {
    sums="$work/SHA256SUMS"
    fetch "$server/agent/SHA256SUMS" "$sums" || die "cannot fetch $server/agent/SHA256SUMS (is the server up and the URL right?)"
    if head -c 512 "$sums" | grep -qi '<html\|<!doctype'; then
        die "the server's SHA256SUMS is malformed (got an HTML page?)"
    fi
    expected=$(awk -v f="$file" '$2 == f || $2 == "*" f { print $1; exit }' "$sums")
    case "$expected" in
        "") die "the server publishes no agent for $os/$arch ($file is not in its SHA256SUMS)" ;;
        *[!0-9a-f]*) die "the server's SHA256SUMS is malformed (got an HTML page?)" ;;
    esac
    [ ${#expected} -eq 64 ] || die "the server's SHA256SUMS is malformed (got an HTML page?)"
}

install_binary() {
    if [ -f "$dest" ] && [ "$(sha256_of "$dest")" = "$expected" ]; then
        say "$dest is already the served build ($expected)"
        return 0
    fi
    if [ "$dry_run" = 1 ]; then
        say "would download $server/agent/blobs/sha256/$expected (else $server/agent/binary?os=$os&arch=$arch), verify sha256 $expected and install it as $dest"
        return 0
    fi
    mkdir -p "$bin_dir" || die "cannot create $bin_dir"
    # The temporary file sits next to the destination so the final rename is atomic.
    tmp=$(mktemp "$bin_dir/.restic-manager-agent.XXXXXX") || die "cannot create a temporary file in $bin_dir"
    say "downloading the $os/$arch agent from $server"
    fetch_by_digest "$server/agent/blobs/sha256/$expected" "$server/agent/binary?os=$os&arch=$arch" "$tmp" ||
        die "download failed; the existing agent (if any) is untouched"
    actual=$(sha256_of "$tmp")
    if [ "$actual" != "$expected" ]; then
        if head -c 512 "$tmp" | grep -qi '<html\|<!doctype'; then
            die "the server returned an HTML page instead of the agent; the existing agent (if any) is untouched"
        fi
        die "checksum mismatch: expected $expected, got $actual; the existing agent (if any) is untouched"
    fi
    chmod 0755 "$tmp" || die "cannot make $tmp executable"
    version=$("$tmp" --version 2>/dev/null) || die "the downloaded agent does not run on this host; the existing agent (if any) is untouched"
    case "$version" in
        restic-manager-agent\ *) ;;
        *) die "the downloaded file is not a restic-manager agent; the existing agent (if any) is untouched" ;;
    esac
    mv -f "$tmp" "$dest" || die "cannot move the agent into place at $dest"
    tmp=""
    say "installed $dest ($version)"
}

# install_restic: with --with-restic, the server's restic for this host as $restic_dest: the checksum from the same
# SHA256SUMS, a temporary file beside the destination, `version` must print restic's version line of restic 0.14 or
# newer (within 15 s where `timeout` exists), then an atomic rename. It runs last, after the agent, its enrollment
# and its service are in place, and never stops the install: a failure is a warning (the exit status stays 0) and
# leaves any earlier restic-manager-restic as it was. The served restic is Debian's build, dynamically linked against
# glibc >= 2.34: hosts with an older or another libc (Alpine, RHEL 8, Ubuntu 20.04, Debian 11) cannot run it.
install_restic() {
    [ "$with_restic" = 1 ] || return 0
    if ! restic_step; then
        if [ -n "${tmp:-}" ]; then rm -f "$tmp"; tmp=""; fi
        restic_warning=1
    fi
}

restic_skip() {
    say "warning: restic not installed: $*; $restic_dest (if any) is untouched and the agent install is complete (the agent uses a restic on PATH, or installs the served one itself when it can)"
    return 1
}

restic_step() {
    restic_expected=$(awk -v f="$restic_file" '$2 == f || $2 == "*" f { print $1; exit }' "$work/SHA256SUMS")
    case "$restic_expected" in
        "") restic_skip "the server publishes no restic for $os/$arch ($restic_file is not in its SHA256SUMS); install restic yourself or drop one into the server's restic-binaries/"; return 1 ;;
        *[!0-9a-f]*) restic_skip "the server's SHA256SUMS is malformed (got an HTML page?)"; return 1 ;;
    esac
    [ ${#restic_expected} -eq 64 ] || { restic_skip "the server's SHA256SUMS is malformed (got an HTML page?)"; return 1; }
    if [ -f "$restic_dest" ] && [ "$(sha256_of "$restic_dest")" = "$restic_expected" ]; then
        say "$restic_dest is already the served restic ($restic_expected)"
        return 0
    fi
    if [ "$dry_run" = 1 ]; then
        say "would download $server/restic/blobs/sha256/$restic_expected (else $server/restic/binary?os=$os&arch=$arch), verify sha256 $restic_expected, smoke-run it and install it as $restic_dest (a failure only warns)"
        return 0
    fi
    tmp=$(mktemp "$bin_dir/.restic-manager-restic.XXXXXX") || { restic_skip "cannot create a temporary file in $bin_dir"; return 1; }
    say "downloading the $os/$arch restic from $server"
    fetch_by_digest "$server/restic/blobs/sha256/$restic_expected" "$server/restic/binary?os=$os&arch=$arch" "$tmp" ||
        { restic_skip "the restic download failed"; return 1; }
    actual=$(sha256_of "$tmp")
    if [ "$actual" != "$restic_expected" ]; then
        restic_skip "restic checksum mismatch: expected $restic_expected, got $actual"
        return 1
    fi
    chmod 0755 "$tmp" || { restic_skip "cannot make $tmp executable"; return 1; }
    if command -v timeout >/dev/null 2>&1; then
        restic_version=$(timeout 15 "$tmp" version 2>/dev/null) || { restic_skip "the downloaded restic does not run on this host (the served restic needs glibc >= 2.34)"; return 1; }
    else
        restic_version=$("$tmp" version 2>/dev/null) || { restic_skip "the downloaded restic does not run on this host (the served restic needs glibc >= 2.34)"; return 1; }
    fi
    restic_version=$(printf '%s\n' "$restic_version" | head -n 1)
    if ! restic_supported "$restic_version"; then
        restic_skip "the downloaded file is not restic 0.14 or newer (its version printed: $(printf '%s' "$restic_version" | cut -c 1-80 | tr -cd '[:print:]'))"
        return 1
    fi
    mv -f "$tmp" "$restic_dest" || { restic_skip "cannot move restic into place at $restic_dest"; return 1; }
    tmp=""
    say "installed $restic_dest ($restic_version)"
}

# restic_supported LINE: LINE is restic's version line, `restic MAJOR.MINOR[.PATCH] …`, of restic 0.14 or newer
# (what the agent requires).
restic_supported() {
    case "$1" in restic\ *) ;; *) return 1 ;; esac
    rs_version=${1#restic }
    rs_version=${rs_version%% *}
    rs_major=${rs_version%%.*}
    case "$rs_version" in *.*) ;; *) return 1 ;; esac
    rs_minor=${rs_version#*.}
    rs_minor=${rs_minor%%.*}
    for rs_part in "$rs_major" "$rs_minor"; do
        case "$rs_part" in "" | *[!0-9]*) return 1 ;; esac
        [ ${#rs_part} -le 6 ] || return 1
    done
    [ "$rs_major" -gt 0 ] || [ "$rs_minor" -ge 14 ]
}

enroll() {
    if [ -f "$config" ]; then
        say "already enrolled ($config exists); not enrolling again"
        return 0
    fi
    if [ -z "$token" ]; then
        if [ "$dry_run" = 1 ]; then
            say "no token: would skip enrollment (already enrolled elsewhere, or enroll later); nothing is written to $config"
        else
            say "no --token given: the agent is installed but not enrolled"
        fi
        say "enroll later with: RM_ENROLL_TOKEN=TOKEN $dest enroll --server $server (it saves the identity to $config)"
        return 0
    fi
    if [ "$dry_run" = 1 ]; then
        say "would enroll with $server (token from the environment) and save the identity to $config (mode 0600)"
        if [ -n "$pin" ]; then say "the agent would check the server's key against $pin and keep its certificate as $config_dir/server-cert.pem"; fi
        return 0
    fi
    # The token reaches the agent through its environment, not its command line (which any user can read in ps).
    set -- enroll --server "$server" --config "$config"
    if [ -n "$cacert" ]; then set -- "$@" --cacert "$cacert"; fi
    if [ "$insecure" = 1 ]; then set -- "$@" --insecure; fi
    if [ -n "$pin" ]; then set -- "$@" --pin "$pin"; fi
    if [ "$allow_plain_http" = 1 ]; then set -- "$@" --allow-plain-http; fi
    RM_ENROLL_TOKEN=$token
    export RM_ENROLL_TOKEN
    run "$dest" "$@" || die "enrollment failed (see the message above)"
    unset RM_ENROLL_TOKEN
}

install_service() {
    if [ "$no_service" = 1 ]; then
        if [ "$dry_run" = 1 ]; then
            say "--no-service: would not install or start a service; run the agent with: $dest run"
        else
            say "not installing a service (--no-service); run the agent with: $dest run"
        fi
        return 0
    fi
    if ! has_systemd; then
        if [ "$dry_run" = 1 ]; then
            say "systemd is not running on this host: would not install a service; start the agent with your init system:"
        else
            say "systemd is not running on this host; start the agent with your init system:"
        fi
        say "  $dest run"
        return 0
    fi
    unit=/etc/systemd/system/restic-manager-agent.service
    if [ "$dry_run" = 1 ]; then
        say "would install the systemd unit $unit (running $dest with $config), enable and start it:"
    fi
    fetch "$server/install/restic-manager-agent.service" "$work/unit" || die "cannot fetch the systemd unit from $server"
    grep -q '^\[Service\]' "$work/unit" || die "the server's unit file is malformed (got an HTML page?)"
    sed "s#/usr/local/bin#$bin_dir#g; s#/etc/restic-manager/agent.json#$config#g" "$work/unit" >"$work/unit.final"
    run install -m 0644 "$work/unit.final" "$unit"
    dropin=/etc/systemd/system/restic-manager-agent.service.d
    if [ -n "${HTTPS_PROXY:-}${HTTP_PROXY:-}${NO_PROXY:-}${https_proxy:-}${http_proxy:-}${no_proxy:-}" ]; then
        {
            echo "[Service]"
            for var in HTTPS_PROXY HTTP_PROXY NO_PROXY https_proxy http_proxy no_proxy; do
                eval "value=\${$var:-}"
                # shellcheck disable=SC2154 # value is set by the eval above
                [ -n "$value" ] && printf 'Environment="%s=%s"\n' "$var" "$value"
            done
        } >"$work/proxy.conf"
        run mkdir -p "$dropin"
        run install -m 0644 "$work/proxy.conf" "$dropin/proxy.conf"
    fi
    run systemctl daemon-reload
    run systemctl enable --now restic-manager-agent.service
    run systemctl restart restic-manager-agent.service
    say "service restic-manager-agent enabled and started"
}

cleanup() {
    if [ -n "${tmp:-}" ]; then rm -f "$tmp"; fi
    if [ -n "${work:-}" ]; then rm -rf "$work"; fi
}

main() {
    set -u
    tmp=""
    work=""
    parse_args "$@"
    resolve_server
    detect_platform
    pick_tools
    check_permissions
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    work=$(mktemp -d) || die "cannot create a temporary directory"
    write_auth
    if [ "$dry_run" = 1 ]; then say "dry run: nothing is changed; the plan:"; fi
    expected_checksum
    install_binary
    enroll
    install_service
    restic_warning=0
    install_restic
    if [ "$dry_run" = 1 ]; then
        say "dry run: done, nothing was changed"
    elif [ "$restic_warning" = 1 ]; then
        say "done (without restic: see the warning above)"
    else
        say "done"
    fi
}

main "$@"
}
