#!/bin/sh
# Install the real MTAs the end-to-end tests drive (idempotent; < 1 s when all is present).
#
#   Postfix  - the Debian package, installed normally (its daemons are NOT started: package
#              scripts run under a policy-rc.d that forbids starting services).
#   Sendmail - conflicts with Postfix as a package, so its .debs are downloaded and unpacked
#              with dpkg-deb -x into $MTLS_SENDMAIL_ROOT (default /opt/mtls-test/sendmail); its
#              shared-library dependencies are installed as ordinary packages.
#   Clients  - swaks (+ libnet-ssleay-perl for --tls), m4 (builds sendmail.cf), miltertest.
#
# Run as root or with sudo available. Prints what it installs; prints nothing when done before.
set -eu

SENDMAIL_ROOT=${MTLS_SENDMAIL_ROOT:-/opt/mtls-test/sendmail}   # same variable as mta.py
SENDMAIL_PKGS="sendmail-bin sendmail-base sendmail-cf"
# postfix + run-time libraries of /usr/libexec/sendmail/sendmail + clients and build tools.
APT_PKGS="postfix m4 swaks libnet-ssleay-perl miltertest \
libdb5.3 libldap-2.5-0 liblockfile1 libnsl2 libsasl2-2 libssl3 libwrap0"

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi

missing=""
for p in $APT_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
stamp="$SENDMAIL_ROOT/.unpacked"
need_sendmail=0
if [ ! -f "$stamp" ] || [ ! -x "$SENDMAIL_ROOT/usr/libexec/sendmail/sendmail" ]; then
    need_sendmail=1
fi

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
    echo "install_mtas: installing apt packages:$missing"
    apt_update
    # Never let package scripts start daemons on this machine (CI-safe). Keep an existing
    # policy-rc.d untouched; otherwise put a temporary "deny all" one in place.
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod 755 "$policy"
        own_policy=1
    fi
    echo "postfix postfix/main_mailer_type select Local only" | $SUDO debconf-set-selections
    echo "postfix postfix/mailname string localhost.localdomain" | $SUDO debconf-set-selections
    rc=0
    # shellcheck disable=SC2086
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $missing >/dev/null || rc=$?
    if [ "$own_policy" = 1 ]; then $SUDO rm -f "$policy"; fi
    [ "$rc" = 0 ] || { echo "install_mtas: apt-get install failed ($rc)" >&2; exit "$rc"; }
    # Belt and braces: if the system Postfix instance we just installed got started anyway, stop
    # it (a Postfix that was installed before is none of our business).
    case " $missing " in *" postfix "*) just_installed=1 ;; *) just_installed=0 ;; esac
    if [ "$just_installed" = 1 ] && $SUDO postfix status >/dev/null 2>&1; then
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
    if ! (cd "$tmp" && $SUDO apt-get download -qq $SENDMAIL_PKGS >/dev/null 2>&1); then
        apt_update
        (cd "$tmp" && $SUDO apt-get download -qq $SENDMAIL_PKGS >/dev/null)
    fi
    $SUDO rm -rf "$SENDMAIL_ROOT"
    $SUDO mkdir -p "$SENDMAIL_ROOT"
    for deb in "$tmp"/*.deb; do
        $SUDO dpkg-deb -x "$deb" "$SENDMAIL_ROOT"
    done
    $SUDO touch "$stamp"
fi
echo "install_mtas: done"
