#!/usr/bin/env bash
# Builds the Debian package from this checkout with dpkg-deb (no debhelper,
# no cargo-deb: every file it installs is listed here).
#
#   scripts/build-deb.sh [BINARY] [OUTDIR]
#
# BINARY defaults to target/release/mailtriage (built with `cargo build
# --release --locked` when missing); OUTDIR to target/debian. Prints the path
# of the .deb. Needs dpkg-dev (dpkg-shlibdeps), gzip, python3 and cargo (for
# the third-party licence notices).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$root/target/release/mailtriage}
out=${2:-$root/target/debian}
[[ $bin = /* ]] || bin=$PWD/$bin
[[ $out = /* ]] || out=$PWD/$out
cd "$root"
if [[ ! -x $bin ]]; then
  [[ $# -eq 0 ]] || { echo "build-deb.sh: $bin is not an executable" >&2; exit 1; }
  cargo build --release --locked
fi

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pkg=$work/mailtriage_${version}_$arch
doc=$pkg/usr/share/doc/mailtriage

install -D -m 0755 "$bin" "$pkg/usr/bin/mailtriage"
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$pkg/usr/bin/mailtriage"
# The shipped configuration, with the model under the state directory.
install -D -m 0644 conf/mailtriage.toml "$pkg/etc/mailtriage/mailtriage.toml"
sed -i -e 's|^path = "../models/all-MiniLM-L6-v2" |path = "/var/lib/mailtriage/models/all-MiniLM-L6-v2"|' \
  -e 's#^\# \(department\|priority\)_head = "\.\./models/heads/#\# \1_head = "/var/lib/mailtriage/models/heads/#' \
  "$pkg/etc/mailtriage/mailtriage.toml"
! grep -q '"\.\./' "$pkg/etc/mailtriage/mailtriage.toml" \
  || { echo "build-deb.sh: a checkout-relative path is left in the packaged configuration" >&2; exit 1; }
grep -q '^path = "/var/lib/mailtriage/models/' "$pkg/etc/mailtriage/mailtriage.toml" \
  || { echo "build-deb.sh: [model] path not found in conf/mailtriage.toml" >&2; exit 1; }
install -D -m 0644 systemd/mailtriage.service "$pkg/lib/systemd/system/mailtriage.service"
install -D -m 0644 packaging/debian/sysusers.conf "$pkg/usr/lib/sysusers.d/mailtriage.conf"
install -D -m 0644 packaging/debian/tmpfiles.conf "$pkg/usr/lib/tmpfiles.d/mailtriage.conf"
install -D -m 0755 scripts/fetch-model.sh "$pkg/usr/share/mailtriage/fetch-model.sh"
install -D -m 0644 packaging/debian/lintian-overrides "$pkg/usr/share/lintian/overrides/mailtriage"

# Generated from the binary itself, so they never drift from the code.
mkdir -p "$pkg/usr/share/man/man1" "$pkg/usr/share/bash-completion/completions" \
  "$pkg/usr/share/zsh/vendor-completions" "$pkg/usr/share/fish/vendor_completions.d"
# mailtriage.1 and a page per subcommand (mailtriage-serve.1…), which mailtriage.1 refers to.
"$bin" generate man --out-dir "$pkg/usr/share/man/man1"
gzip -9n "$pkg"/usr/share/man/man1/*.1
"$bin" generate complete-bash > "$pkg/usr/share/bash-completion/completions/mailtriage"
"$bin" generate complete-zsh > "$pkg/usr/share/zsh/vendor-completions/_mailtriage"
"$bin" generate complete-fish > "$pkg/usr/share/fish/vendor_completions.d/mailtriage.fish"

mkdir -p "$doc/docs"
install -m 0644 README.md "$doc/README.md"
install -m 0644 docs/*.md docs/grafana-dashboard.json "$doc/docs/"
install -m 0644 packaging/debian/copyright "$doc/copyright"
sed "s/@VERSION@/$version/" packaging/debian/changelog | gzip -9n > "$doc/changelog.gz"
python3 scripts/third-party-licenses.py | gzip -9n > "$doc/THIRD-PARTY-LICENSES.gz"

# Shared-library dependencies, as dpkg-shlibdeps finds them for the binary.
mkdir -p "$work/src/debian"
printf 'Source: mailtriage\n\nPackage: mailtriage\nArchitecture: any\n' > "$work/src/debian/control"
depends=$(cd "$work/src" && dpkg-shlibdeps -O "$pkg/usr/bin/mailtriage" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[[ -n $depends ]] || { echo "build-deb.sh: dpkg-shlibdeps found no dependencies" >&2; exit 1; }

mkdir -p "$pkg/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" -e "s/@DEPENDS@/$depends/" \
  packaging/debian/control.in > "$pkg/DEBIAN/control"
echo /etc/mailtriage/mailtriage.toml > "$pkg/DEBIAN/conffiles"
for s in postinst prerm postrm; do install -m 0755 "packaging/debian/$s" "$pkg/DEBIAN/$s"; done
(cd "$pkg" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) > "$pkg/DEBIAN/md5sums"
chmod 0644 "$pkg/DEBIAN/md5sums" "$pkg/DEBIAN/control" "$pkg/DEBIAN/conffiles"
find "$pkg" -type d -exec chmod 0755 {} +

mkdir -p "$out"
deb=$out/mailtriage_${version}_$arch.deb
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
echo "$deb"
