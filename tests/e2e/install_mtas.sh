#!/bin/sh
# Install the real MTAs the end-to-end tests drive (idempotent; < 1 s when all is present).
#
#   Postfix  - the Debian package, installed only when NO mail transport agent is installed on
#              this host (a CI machine). On a host that already runs Postfix the installed
#              package is used as it is (the tests run private instances with their own
#              config_directory; the host's instance is never started, stopped or reconfigured).
#              On a host with another MTA (Sendmail, Exim, ...) Postfix is NOT installed (the
#              packages conflict: apt would remove the host's MTA) and the Postfix tests skip.
#   Sendmail - never installed as a package: its .debs are downloaded and unpacked with
#              dpkg-deb -x into $MTLS_SENDMAIL_ROOT (default /opt/mtls-test/sendmail); its
#              shared-library dependencies are installed as ordinary packages.
#   Clients  - swaks (+ libnet-ssleay-perl for --tls), m4 (builds sendmail.cf), miltertest.
#
# Before installing anything, apt-get simulates the installation; if it would remove a package
# or install a mail transport agent other than the planned Postfix, nothing is installed and
# the script says why (exit 1).
#
#   install_mtas.sh          decide, then install what is missing (root or sudo)
#   install_mtas.sh --plan   only print the decision ("install: ...", "skip: ..."), change nothing
set -eu

SENDMAIL_ROOT=${MTLS_SENDMAIL_ROOT:-/opt/mtls-test/sendmail}   # same variable as mta.py
SENDMAIL_PKGS="sendmail-bin sendmail-base sendmail-cf"
# run-time libraries of /usr/libexec/sendmail/sendmail + clients and build tools.
APT_PKGS="m4 swaks libnet-ssleay-perl miltertest \
libdb5.3 libldap-2.5-0 liblockfile1 libnsl2 libsasl2-2 libssl3 libwrap0"

# One dpkg-query call: "package<TAB>status<TAB>provides" for every package dpkg knows.
DPKG_TABLE=$(dpkg-query -W -f='${Package}\t${Status}\t${Provides}\n' 2>/dev/null || true)

installed() {
    printf '%s\n' "$DPKG_TABLE" | awk -F'\t' -v p="$1" \
        '$1 == p && $2 ~ / installed$/ { found = 1 } END { exit !found }'
}

# Installed packages that provide mail-transport-agent (postfix, sendmail-bin, exim4-daemon-*).
host_mtas() {
    printf '%s\n' "$DPKG_TABLE" | awk -F'\t' \
        '$2 ~ / installed$/ && $3 ~ /(^|[ ,])mail-transport-agent([ ,(]|$)/ { printf "%s ", $1 }' \
        | sed 's/ $//'
}

# Sets $missing (apt packages to install) and prints one line per decision.
plan() {
    missing=""
    mtas=$(host_mtas)
    if installed postfix; then
        echo "use: postfix (installed on this host; the tests run private instances)"
    elif [ -n "$mtas" ]; then
        echo "skip: postfix: not installed, and this host's mail transport agent ($mtas)" \
            "conflicts with it; installing it would remove $mtas, so the Postfix" \
            "end-to-end tests will be skipped"
    else
        missing="postfix"
        echo "install: postfix (no mail transport agent on this host)"
    fi
    for p in $APT_PKGS; do
        installed "$p" || missing="$missing $p"
    done
    missing=$(echo "$missing" | sed 's/^ *//')
    [ -z "$missing" ] || echo "install: $missing"
    need_sendmail=0
    if [ ! -f "$SENDMAIL_ROOT/.unpacked" ] || \
       [ ! -x "$SENDMAIL_ROOT/usr/libexec/sendmail/sendmail" ]; then
        need_sendmail=1
        echo "unpack: $SENDMAIL_PKGS into $SENDMAIL_ROOT (no package is installed)"
    fi
}

# apt-get's simulation must neither remove a package nor bring in another MTA.
check_simulation() {
    sim=$($SUDO apt-get install -s -qq --no-install-recommends "$@" 2>&1) || {
        echo "install_mtas: apt-get cannot install $*: $sim" >&2
        exit 1
    }
    removed=$(printf '%s\n' "$sim" | awk '$1 == "Remv" { printf " %s", $2 }')
    if [ -n "$removed" ]; then
        echo "install_mtas: refusing to install $*: apt would remove$removed" >&2
        exit 1
    fi
    for p in $(printf '%s\n' "$sim" | awk '$1 == "Inst" { print $2 }'); do
        [ "$p" = postfix ] && continue
        if apt-cache show --no-all-versions "$p" 2>/dev/null | \
           grep -q '^Provides:.*mail-transport-agent'; then
            echo "install_mtas: refusing to install $*: apt would install the MTA $p" >&2
            exit 1
        fi
    done
}

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi

if [ "${1:-}" = "--plan" ]; then
    plan
    exit 0
fi

decisions=$(plan)
plan >/dev/null
# "skip" decisions are said every time: they explain skipped tests.
printf '%s\n' "$decisions" | grep '^skip:' | sed 's/^/install_mtas: /' || true

if [ -z "$missing" ] && [ "$need_sendmail" = 0 ]; then
    exit 0
fi

updated=0
apt_update() {
    if [ "$updated" = 0 ]; then
        $SUDO apt-get update -qq
        updated=1
    fi
}

if [ -n "$missing" ]; then
    echo "install_mtas: installing apt packages: $missing"
    apt_update
    # shellcheck disable=SC2086
    check_simulation $missing
    # Never let package scripts start daemons on this machine (CI-safe). Keep an existing
    # policy-rc.d untouched; otherwise put a temporary "deny all" one in place.
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod 755 "$policy"
        own_policy=1
    fi
    case " $missing " in *" postfix "*) new_postfix=1 ;; *) new_postfix=0 ;; esac
    if [ "$new_postfix" = 1 ]; then
        echo "postfix postfix/main_mailer_type select Local only" | $SUDO debconf-set-selections
        echo "postfix postfix/mailname string localhost.localdomain" | \
            $SUDO debconf-set-selections
    fi
    rc=0
    # shellcheck disable=SC2086
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $missing >/dev/null || rc=$?
    if [ "$own_policy" = 1 ]; then $SUDO rm -f "$policy"; fi
    [ "$rc" = 0 ] || { echo "install_mtas: apt-get install failed ($rc)" >&2; exit "$rc"; }
    # Belt and braces: if the system Postfix instance we just installed got started anyway, stop
    # it (a Postfix that was installed before is none of our business).
    if [ "$new_postfix" = 1 ] && $SUDO postfix status >/dev/null 2>&1; then
        echo "install_mtas: stopping the system postfix instance started by the package"
        $SUDO postfix stop >/dev/null 2>&1 || true
    fi
fi

if [ "$need_sendmail" = 1 ]; then
    echo "install_mtas: unpacking $SENDMAIL_PKGS into $SENDMAIL_ROOT"
    tmp=$(mktemp -d)
    trap '$SUDO rm -rf "$tmp"' EXIT
    # let apt's sandbox user write the downloads (else apt warns and downloads as root)
    $SUDO chown _apt "$tmp" 2>/dev/null || true
    # shellcheck disable=SC2086
    if ! (cd "$tmp" && $SUDO apt-get download -qq $SENDMAIL_PKGS >/dev/null 2>&1); then
        apt_update
        # shellcheck disable=SC2086
        (cd "$tmp" && $SUDO apt-get download -qq $SENDMAIL_PKGS >/dev/null)
    fi
    $SUDO rm -rf "$SENDMAIL_ROOT"
    $SUDO mkdir -p "$SENDMAIL_ROOT"
    for deb in "$tmp"/*.deb; do
        $SUDO dpkg-deb -x "$deb" "$SENDMAIL_ROOT"
    done
    $SUDO touch "$SENDMAIL_ROOT/.unpacked"
fi
echo "install_mtas: done"
