#!/bin/sh
# Build the Debian package of mtls-milter: a virtualenv with the package and its Python
# dependencies (newer than Debian's) in /opt/mtls-milter, plus /usr/bin/mtls-milter, the systemd
# units, sysusers.d/tmpfiles.d files, man pages, the example configuration and the docs.
#
#   sh packaging/build-deb.sh [OUTDIR]        (default: dist/)   ->  OUTDIR/mtls-milter_V-1_ARCH.deb
#
# Needs: /usr/bin/python3 (the Debian interpreter the package depends on) with venv, gcc,
# python3-dev and libmilter-dev (pymilter is compiled), dpkg-deb, gzip, and pip's index.
# Nothing is installed on this machine; everything happens in a temporary directory.
# Why not dh-virtualenv (Debian has it): it needs the whole debhelper tool chain and a debian/
# source tree for the same result, a venv in /opt; this script is the short path.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/dist}
python=/usr/bin/python3
prefix=/opt/mtls-milter
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/pyproject.toml" | head -1)
arch=$(dpkg --print-architecture)
pyver=$($python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
pynext=$($python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
mkdir -p "$root$prefix" "$out"

# The venv, built in the staging tree; only the scripts' #! lines name that path.
$python -m venv "$root$prefix"
"$root$prefix/bin/pip" install -q --disable-pip-version-check --no-compile "$here"
"$root$prefix/bin/pip" uninstall -q -y pip
sed -i "s|$root||g" "$root$prefix/pyvenv.cfg"
for script in "$root$prefix"/bin/*; do
    [ -f "$script" ] && [ ! -L "$script" ] || continue
    sed -i "1s|^#!$root$prefix/|#!$prefix/|" "$script"
done
find "$root$prefix" -name __pycache__ -type d -prune -exec rm -rf {} +
rm -f "$root$prefix"/bin/Activate.ps1 "$root$prefix"/bin/activate*

install -d "$root/usr/bin" "$root/lib/systemd/system" "$root/usr/lib/sysusers.d" \
    "$root/usr/lib/tmpfiles.d" "$root/usr/share/man/man8" "$root/usr/share/man/man5" \
    "$root/usr/share/doc/mtls-milter/examples" "$root/etc/mtls-milter" "$root/DEBIAN"
ln -s "$prefix/bin/mtls-milter" "$root/usr/bin/mtls-milter"
install -m 644 "$here"/examples/systemd/*.service "$root/lib/systemd/system/"
install -m 644 "$here/examples/systemd/mtls-milter.sysusers" "$root/usr/lib/sysusers.d/mtls-milter.conf"
install -m 644 "$here/examples/systemd/mtls-milter.tmpfiles" "$root/usr/lib/tmpfiles.d/mtls-milter.conf"
gzip -9n < "$here/man/mtls-milter.8" > "$root/usr/share/man/man8/mtls-milter.8.gz"
gzip -9n < "$here/man/mtls-milter.toml.5" > "$root/usr/share/man/man5/mtls-milter.toml.5.gz"
install -m 644 "$here/examples/mtls-milter.toml" "$root/etc/mtls-milter/mtls-milter.toml"
cp -r "$here/docs" "$here/README.md" "$root/usr/share/doc/mtls-milter/"
cp -r "$here/examples/postfix" "$here/examples/sendmail" "$here/examples/mtls-milter.toml" \
    "$root/usr/share/doc/mtls-milter/examples/"
install -m 644 "$here/LICENSE" "$root/usr/share/doc/mtls-milter/copyright"

size=$(du -sk "$root" | cut -f1)
sed -e "s/@VERSION@/$version-1/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    -e "s/@PYVER@/$pyver/" -e "s/@PYNEXT@/$pynext/" \
    "$here/packaging/debian/control" > "$root/DEBIAN/control"
echo /etc/mtls-milter/mtls-milter.toml > "$root/DEBIAN/conffiles"
for script in postinst postrm; do
    install -m 755 "$here/packaging/debian/$script" "$root/DEBIAN/$script"
done

deb="$out/mtls-milter_${version}-1_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
